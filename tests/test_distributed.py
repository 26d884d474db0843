"""Data-parallel `cryospin abinit` under torchrun with gloo ranks on the CPU (engine/distributed.py).

Real processes and a real torch.distributed process group: `python -m torch.distributed.run`
(torchrun) starts the ranks. One process and 2 ranks on the same simulated set and seed
must give the same map and poses (a step of 2 ranks is the step of one process on the
same global batch), share the work, resume after a kill, and fail together on bad input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation

from cryospin_relion.geometry.fsc import fsc

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import simulated_star  # noqa: E402

RUN = ["--quiet", "--heads", "2", "--epochs-amortized", "3", "--epochs-autodecode", "3", "--batch-size", "32",
       "--j", "1", "--seed", "5", "--stage1-particles", "160", "--stage1-trials", "1"]


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    return simulated_star(tmp_path_factory.mktemp("distsim"), n=320, map_seed=3, sim_seed=4)


def _cmd(star: Path, out: Path, ranks: int, *extra: str) -> list[str]:
    args = ["abinit", "--i", str(star), "--o", str(out), *RUN, *extra]
    if ranks == 1:
        return [sys.executable, "-m", "cryospin_relion.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "-m", "cryospin_relion.cli", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _rotations(star: Path) -> Rotation:
    p = starfile.read(star)["particles"]
    return Rotation.from_euler("ZYZ", p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), degrees=True)


def _agree(a: Path, b: Path) -> tuple[np.ndarray, float]:
    """(FSC per shell between the two runs' maps, median rotation difference in degrees). The maps are the
    unfiltered sums of the half maps (map.mrc is low-passed at each run's own resolution)."""
    m1, m2 = (sum(torch.from_numpy(mrcfile.read(d / f"half{i}_map.mrc").astype(np.float64)) for i in (1, 2))
              for d in (a, b))
    diff = np.degrees((_rotations(a / "particles.star").inv() * _rotations(b / "particles.star")).magnitude())
    return fsc(m1, m2).numpy(), float(np.median(diff))


def test_two_ranks_equal_one_process_and_share_the_work(star, tmp_path):
    one = _run(_cmd(star, tmp_path / "one", 1))
    assert one.returncode == 0, one.stderr
    two = _run(_cmd(star, tmp_path / "two", 2))
    assert two.returncode == 0, two.stderr
    # the same steps: the epochs' losses agree (stage 1 to float precision; stage 2 drifts a little, as the
    # per-row Adam steps of poses near their optimum turn float-order differences into small moves)
    h1, h2 = (json.loads((tmp_path / d / "history.json").read_text())["loss"] for d in ("one", "two"))
    assert np.allclose(h1, h2, rtol=1e-3), (h1, h2)
    f, med = _agree(tmp_path / "one", tmp_path / "two")
    half, top = (len(f) - 1) // 2, int(0.8 * (len(f) - 1))
    assert f[1:half + 1].min() >= 0.99 and f[1:top + 1].min() >= 0.95, f"maps differ: FSC {f.round(4)}"
    assert med < 1.0, f"poses differ: median {med:.2f} deg"
    # the final scores are split over the ranks too: every particle scored, as in one process
    s1, s2 = (starfile.read(tmp_path / d / "particles.star")["particles"] for d in ("one", "two"))
    assert (s2["rlnCryospinLoss"] > 0).all()
    c1, c2 = s1["rlnMaxValueProbDistribution"].to_numpy(), s2["rlnMaxValueProbDistribution"].to_numpy()
    assert np.corrcoef(c1, c2)[0, 1] > 0.9 and np.median(np.abs(c1 - c2)) < 0.05, (c1[:8], c2[:8])
    # rank 0 alone writes and logs: one run.log, naming the ranks; the other rank prints nothing but errors
    log = (tmp_path / "two" / "run.log").read_text()
    assert "2 ranks (data parallel)" in log
    assert two.stdout == "" and "Traceback" not in two.stderr
    # the ranks share the work: in every epoch each rank computed its half of the images of the one process's
    # epoch (what a rank that did the whole batch would double). The CPU time of 2 ranks against one process is
    # a figure of bench/scale.py (--ranks), not of a test: at this size start-up and reports outweigh training.
    r1, r2 = (json.loads((tmp_path / d / "history.json").read_text())["rank_images"] for d in ("one", "two"))
    for e, (a, b) in enumerate(zip(r1, r2, strict=True)):
        assert len(a) == 1 and len(b) == 2 and sum(b) == a[0], (e, a, b)
        assert min(b) >= 0.45 * a[0], f"epoch {e + 1}: images per rank {b} of {a[0]}"
    assert "images per rank" in log


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_killed_rank_stops_the_run_which_then_resumes(star, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(star, out, 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not (out / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() - t0 < 600:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()
    ranks = _children(proc.pid)  # torchrun's workers
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)  # rank 1 dies (a lost GPU, the OOM killer)
    t_kill = time.monotonic()
    proc.wait(timeout=120)
    assert time.monotonic() - t_kill < 60, "the other rank must not wait for the dead one"
    assert proc.returncode != 0
    time.sleep(0.5)
    assert not any(Path(f"/proc/{r}").exists() and "zombie" not in Path(f"/proc/{r}/status").read_text()
                   for r in ranks), "a rank outlived the run"
    ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    epochs_before = len(ck["engine"]["history"]["epochs"])
    done = subprocess.run(_cmd(star, out, 2, "--continue"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    log = (out / "run.log").read_text()
    assert f"resuming at epoch {epochs_before + 1}" in log
    assert (out / "map.mrc").is_file()
    assert len(starfile.read(out / "particles.star")["particles"]) == 320


def test_bad_input_stops_every_rank_with_one_message(star, tmp_path):
    done = subprocess.run(_cmd(star, tmp_path / "bad", 2, "--batch-size", "3"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "--batch-size: 3 is less than 2 x the 2 ranks" in done.stderr
    assert not (tmp_path / "bad").exists()


def test_job_wrappers_start_the_ranks_under_torchrun(star, tmp_path):
    from cryospin_relion.cli import command_argv
    from relion_wrappers.external_job import JobFailed, build_command

    job = tmp_path / "External" / "job010"
    job.mkdir(parents=True)
    base = command_argv("abinit")
    _, cmd = build_command(["--o", f"{job}/", "--in_parts", str(star), "--gpus", "2"], {"continue": False}, base)
    assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    assert cmd[7:9] == ["cryospin_relion.cli", "abinit"] and "--gpus" not in cmd
    _, cmd = build_command(["--o", f"{job}/", "--in_parts", str(star)], {"continue": False}, base)
    assert cmd[:4] == base
    with pytest.raises(JobFailed, match="'gpus' must be a whole number >= 1"):
        build_command(["--o", f"{job}/", "--in_parts", str(star), "--gpus", "0"], {"continue": False}, base)
    assert command_argv("abinit", 4)[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node", "4"]


def test_two_ranks_with_two_classes(star, tmp_path):
    """--classes 2 on 2 gloo ranks: every collective of the class paths (class search and weights, re-seeding,
    the first-pose pass over the classes, stage-2 moves, per-class scores and maps) completes on both ranks,
    and the outputs are a K = 2 run's."""
    out = tmp_path / "k2"
    done = _run(_cmd(star, out, 2, "--classes", "2", "--explore-candidates", "512",
                              "--json-summary", str(tmp_path / "s.json")))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert sum(c["n_particles"] for c in summary["classes"]) == 320
    p = starfile.read(out / "particles.star")["particles"]
    assert len(p) == 320 and set(p["rlnClassNumber"]) <= {1, 2}
    assert any((out / f"class00{k}" / "map.mrc").is_file() for k in (1, 2))
    assert p["rlnMaxValueProbDistribution"].notna().all()
