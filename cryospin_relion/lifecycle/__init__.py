"""The life of a run, around the engine: checks, resume, checkpoints, stop on signal, outputs.

- ``abinit.AbinitRequest`` / ``abinit.run_abinit``: one ``cryospin abinit`` run, from the
  input file to the final outputs (``commands/abinit.py`` only parses its arguments).
- ``checkpoint``: what a checkpoint holds, when it is written, and when it may be continued.
- ``signals``: SIGINT/SIGTERM become a stop request at the next batch boundary.
- ``pose_error``: pose errors against known poses, per epoch (``--true-poses``).
- ``outputs``: maps, FSC, pose files, report and summary at the end.
- ``console``: the log file, console lines and progress bars.

I/O lives here and in ``io/``; the engine (``engine/``) does none.
"""
