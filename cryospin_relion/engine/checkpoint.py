"""The engine's checkpoint: its layout, its version, and the check that it fits the engine.

A checkpoint is a dict of tensors (on the CPU), dicts, lists and primitives only, so
``torch.load(weights_only=True)`` reads it:

- ``version`` (CHECKPOINT_VERSION), ``config`` (the flat config), ``n_particles``, ``box``;
- the schedule position: ``epoch``, ``stage``, ``batch_pos``, ``done``, ``trial`` (stage-1 start);
- ``tally`` (the running epoch's sums), ``history`` (engine/history.py);
- ``models`` (encoder, volume, optimisers), ``pose_table``, ``memory``, ``prev_R``;
- with K classes also ``classes`` (N,), ``class_memories`` (the pose memories of classes 2..K) and
  ``class_scans`` (each class's global-scan sections of the running stage-1 epoch, engine/run.py
  ``_class_scan``: made from volumes of earlier batches, so they cannot be remade on resuming).

No global random state is saved: every random number of a run comes from a seeded
generator (engine/schedule.py ``Seeds``), so a resumed run is identical to an
uninterrupted one on the CPU.
"""

from __future__ import annotations

from cryospin_relion.engine.history import EpochTally, History
from cryospin_relion.engine.stage1 import ScanSlices

CHECKPOINT_VERSION = 2


def engine_state(eng) -> dict:
    """The checkpoint of an ``AbinitEngine``."""
    return {
        "version": CHECKPOINT_VERSION,
        "config": eng.cfg.to_dict(),
        "n_particles": eng.N,
        "box": eng.box,
        "epoch": eng.epoch,
        "stage": eng.stage,
        "batch_pos": eng.batch_pos,
        "done": eng.done,
        "trial": eng.trial,
        "tally": eng.tally.state_dict(),
        "history": eng.history.state_dict(),
        "models": eng.models.state_dict(),
        "pose_table": eng.table.state_dict(),
        "memory": eng.memory.state_dict(),
        "prev_R": None if eng.prev_R is None else eng.prev_R.cpu(),
        **({} if eng.K == 1 else {"classes": eng.classes.cpu(),
                                  "class_memories": [m.state_dict() for m in eng.memories[1:]],
                                  "class_scans": {str(k): {"rot": c.rot.cpu(), "slices": c.slices.cpu(), "crop": c.crop}
                                                  for k, c in eng._scans.items()}}),
    }


def restore_engine(eng, d: dict) -> None:
    """Put checkpoint ``d`` into ``eng``; ValueError when it is of another version or another dataset."""
    if d.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"unsupported checkpoint version {d.get('version')}")
    if d["n_particles"] != eng.N or d["box"] != eng.box:
        raise ValueError(f"checkpoint is for {d['n_particles']} particles at box {d['box']}, "
                         f"not {eng.N} at box {eng.box}")
    eng.models.load_state_dict(d["models"])
    eng.table.load_state_dict(d["pose_table"])
    eng.memory.load_state_dict(d["memory"])
    if eng.K > 1:
        for m, md in zip(eng.memories[1:], d["class_memories"], strict=True):
            m.load_state_dict(md)
        eng.classes = d["classes"].to(eng.device)
        eng._scans = {int(k): ScanSlices(c["rot"].to(eng.device), c["slices"].to(eng.device), int(c["crop"]))
                      for k, c in d.get("class_scans", {}).items()}
    eng.prev_R = None if d["prev_R"] is None else d["prev_R"].to(eng.device)
    eng.epoch, eng.stage, eng.batch_pos = d["epoch"], d["stage"], d["batch_pos"]
    eng.trial = int(d["trial"])
    eng.tally = EpochTally.from_state(d["tally"], eng.world.size)
    eng.history = History.from_state(d["history"])
    # recomputed, not read: --continue may lengthen a finished run (epochs_autodecode is resumable)
    sw = eng.history.switch_epoch
    eng.done = eng.stage == 2 and sw is not None and eng.epoch >= sw + eng.cfg.schedule.epochs_autodecode
