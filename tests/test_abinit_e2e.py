"""End-to-end accuracy: box 32, 2000 simulated particles with CTF, noise (SNR 0.3) and shifts.

Targets (from the brief): median rotation error < 10 deg after the best global alignment
(incl. mirror) and FSC 0.5 vs the truth (backprojection with the aligned poses) below
3x Nyquist, in under ~3 minutes on 2 cores.

Stage 1 finds the pose basin through its exploration candidates (engine/stage1.py) and keeps
the best of 3 starts (engine/run.py, ``AbinitEngine._run_trials``); measured with the defaults on 2 cores:
median error 7.0 deg for engine seeds 0-5 (6.9-7.2), ~40 s (idle machine). Without exploration
(``explore_candidates: 0``) the same run ends at ~100 deg; with a single start 2 of those 6 seeds
ended in a wrong basin (22 and 58 deg).
"""

from __future__ import annotations

import time

import pytest
import torch

from cryospin_relion.config import AbinitConfig
from cryospin_relion.engine.run import AbinitEngine
from cryospin_relion.evaluate.blobs import backproject_fsc, simulate_blobs
from cryospin_relion.evaluate.pose_error import align_pose_sets
from cryospin_relion.geometry.ctf import CTF


@pytest.fixture(scope="module")
def result():
    torch.set_num_threads(2)
    d = simulate_blobs(n=32, N=2000, apix=4.0, snr=0.3, max_shift_px=2.0, seed=0)
    t0 = time.perf_counter()
    eng = AbinitEngine(d["images"], d["apix"], CTF.from_arrays(d["ctf"]), AbinitConfig(), "cpu")
    assert eng.run() == "done"
    wall = time.perf_counter() - t0
    R, t = eng.final_poses()
    al = align_pose_sets(d["R"], R, d["t"], t)
    R_al, t_al = al.to_truth_frame(R, t)
    r = backproject_fsc(d["images"], R_al, t_al, d["apix"], d["ctf"], d["vol"].double())
    return {"wall": wall, "median_deg": al.median_deg, "res05": r["res05"], "nyq": 2 * d["apix"], "eng": eng}


@pytest.mark.slow
def test_e2e_runs_and_learns(result):
    h = result["eng"].history
    assert h.last.loss < h.epochs[0].loss
    assert h.switch_epoch is not None and 2 in h.column("stage")
    print(f"wall {result['wall']:.0f} s")  # speed is measured in bench/abinit.py, not asserted here
    share = h.epochs[0].winner_source_share
    assert share is not None and abs(sum(share.values()) - 1) < 1e-9


@pytest.mark.slow
def test_e2e_accuracy(result):
    assert result["median_deg"] < 10.0, result["median_deg"]
    assert result["res05"] < 3 * result["nyq"], (result["res05"], result["nyq"])
