"""The cryoSPIN engine (no file I/O): stage 1 auto-encoding, the switch, stage 2 auto-decoding.

- ``run.AbinitEngine(images (N, n, n), apix_work, ctf dict of (N,) tensors | None, AbinitConfig, device)``
  ``.run(should_stop, on_epoch_end) -> "done" | "stopped"``, ``.final_poses()``, ``.decoder_map()``,
  ``.state_dict()`` / ``.load_state_dict()`` (checkpoint of tensors/dicts/lists/primitives), ``.history``.
- ``stage1.stage1_step`` / ``stage1.winner_takes_all``; ``stage2.stage2_step``;
  ``losses.prepare_batch`` / ``losses.render`` / ``losses.per_image_loss``.
"""
