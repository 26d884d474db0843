"""Resume after SIGKILL at random moments, and refusal to resume a changed run.

A real `cryospin abinit` process is killed with SIGKILL 10 times at random
moments (during caching, training, checkpoint writes, final outputs); each time
it is restarted with --continue (or afresh when no checkpoint exists yet). Every
resume must finish, lose at most the epoch in progress, and leave valid outputs.
"""

from __future__ import annotations

import json
import os
import random
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

from cryospin_relion import cli

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import simulated_star  # noqa: E402

RUN = ["--quiet", "--heads", "2", "--epochs-amortized", "4", "--epochs-autodecode", "6", "--batch-size", "16",
       "--j", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    return simulated_star(tmp_path_factory.mktemp("killsim"), n=400, map_seed=3, sim_seed=4)


def _cmd(star: Path, out: Path, cont: bool) -> list[str]:
    return [sys.executable, "-m", "cryospin_relion.cli", "abinit", "--i", str(star), "--o", str(out), *RUN,
            *(["--continue"] if cont else [])]


def _completed_epochs(out: Path) -> int:
    """Epochs in the newest complete checkpoint, the newest or the previous one (0 when none). A kill during a
    checkpoint write can leave only the previous one (lifecycle/checkpoint.py): --continue resumes from it."""
    epochs = [0]
    for ck in (out / "checkpoint.pt", out / "checkpoint.prev.pt"):
        if ck.is_file():  # loads: a checkpoint is never half-written
            epochs.append(len(torch.load(ck, map_location="cpu", weights_only=True)["engine"]["history"]["epochs"]))
    return max(epochs)


KILLS = 6  # at random moments 1.5-6 s into each process: start-up, training, checkpoints, final outputs


def test_sigkill_at_random_moments_then_resume(star, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(11)
    kills = attempts = 0
    while kills < KILLS and attempts < 60:
        attempts += 1
        before = _completed_epochs(out)
        proc = subprocess.Popen(_cmd(star, out, cont=before > 0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=rng.uniform(1.5, 6.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            after = _completed_epochs(out)
            assert after >= before, "a kill must not lose a checkpointed epoch"
            continue
        err = proc.stderr.read().decode()
        assert proc.returncode == 0, err
        # finished before the next kill (a fast machine): keep killing its --continue reruns, which
        # redo the final outputs, so the kills also land while maps and pose files are written
    # the last resume finishes (a kill may have hit the final outputs: rerun as a user would)
    done = subprocess.run(_cmd(star, out, cont=_completed_epochs(out) > 0), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["epoch"]) == 10  # every epoch exactly once across all the kills
    for name in ("map.mrc", "half1_map.mrc", "half2_map.mrc", "decoder_map.mrc"):
        with mrcfile.open(out / name) as m:  # strict: a valid MRC
            assert np.isfinite(m.data).all() and m.data.shape == (16, 16, 16)
    parts = starfile.read(out / "particles.star")["particles"]
    assert len(parts) == 400 and set(parts["rlnRandomSubset"]) == {1, 2}
    stale = [p for p in os.listdir(out) if ".tmp" in p]
    assert not stale, f"stale temporary files: {stale}"
    print(f"{kills} SIGKILLs survived")
    assert kills == KILLS


def test_continue_refuses_a_changed_config_or_input(star, tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(star, out, cont=False), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (out / "checkpoint.pt").exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert (out / "checkpoint.pt").is_file()
    args = ["abinit", "--i", str(star), "--o", str(out), *RUN, "--continue"]
    rc = cli.run([a if a != "5" else "6" for a in args])  # another --seed
    assert rc == 2 and "config seed" in capsys.readouterr().err
    # a longer schedule is a legitimate continuation
    rc = cli.run([*args[:-1], "--epochs-autodecode", "1", "--continue"][:])
    assert rc == 0, capsys.readouterr().err


def test_timed_checkpoint_mid_epoch(star, tmp_path):
    """checkpoint_minutes: a checkpoint inside an epoch (batch_pos > 0) that --continue resumes."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("checkpoint_minutes: 0.0001\n")  # after every batch
    proc = subprocess.Popen(_cmd(star, out, cont=False) + ["--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    mid = None
    while time.time() - t0 < 120 and proc.poll() is None:
        if (out / "checkpoint.pt").is_file():
            try:
                state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - replaced while reading
                continue
            if state["engine"]["batch_pos"] > 0:
                mid = state
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mid is not None, "no mid-epoch checkpoint was written"
    done = subprocess.run(_cmd(star, out, cont=True) + ["--config", str(cfg)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert (out / "map.mrc").is_file()
