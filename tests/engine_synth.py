"""A small `cryospin simulate` dataset on disk for the engine's CLI tests.

The in-memory blob datasets (``simulate_blobs``, ``blob_volume``), ``backproject_fsc``
and the pose-set alignment (``pose_error.align_pose_sets``) live in the package:
``cryospin_relion.evaluate.blobs`` and ``cryospin_relion.evaluate.pose_error``.
"""

from __future__ import annotations

from pathlib import Path

from cryospin_relion.evaluate.blobs import blob_volume


def simulated_star(folder, n: int, map_seed: int, sim_seed: int):
    """A small `cryospin simulate` dataset (box 16, 6 A/px, SNR 1) of a blob map; returns its particles.star."""
    from cryospin_relion import cli
    from cryospin_relion.io.mrc import write_mrc

    folder = Path(folder)
    write_mrc(folder / "blob.mrc", blob_volume(16, seed=map_seed).float().numpy(), 6.0)
    rc = cli.run(["simulate", "--map", str(folder / "blob.mrc"), "--o", str(folder / "sim"), "--n", str(n),
                  "--box", "16", "--apix", "6", "--snr", "1", "--seed", str(sim_seed), "--quiet"])
    assert rc == 0
    return folder / "sim" / "particles.star"
