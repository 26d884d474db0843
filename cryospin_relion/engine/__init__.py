"""The cryoSPIN engine (no file I/O): stage 1 auto-encoding, the switch, stage 2 auto-decoding.

- ``run.AbinitEngine``: the state of a run and its schedule (see its module docstring for the
  small interface the run lifecycle uses).
- ``schedule``: Fourier box per epoch, batch order, every random seed (pure functions).
- ``history``: the typed per-epoch records and their ``history.json`` layout; ``tally``: a batch's figures
  summed on the device, read by the host a few times per epoch.
- ``particles``: the images, pixel sizes and CTFs as the engine reads them.
- ``models``: the encoder, the volume and their optimisers; ``checkpoint``: the checkpoint layout;
  ``progress``: the sink the engine reports its progress to.
- ``forward``: the forward model (``Batch``, ``prepare_batch``, ``render``, ``per_image_loss``).
- ``stage1``: winner-takes-all over the heads, the pose search, one stage-1 step.
- ``stage2``: one stage-2 step (per-particle poses, then the volume).
"""
