"""Amortised first poses (#10): the fallback rule, the pass's record, the config."""

from __future__ import annotations

import json

import pytest
import torch

from cryospin_relion.config import AbinitConfig, SearchConfig
from cryospin_relion.engine.forward import prepare_batch
from cryospin_relion.engine.history import WINNER_SOURCES
from cryospin_relion.engine.run import AbinitEngine
from cryospin_relion.engine.stage1 import GLOBAL, first_poses, pose_fit
from cryospin_relion.errors import InputError
from cryospin_relion.evaluate.blobs import simulate_blobs
from cryospin_relion.geometry.ctf import CTF
from cryospin_relion.geometry.fourier import ht3_centered
from cryospin_relion.geometry.rotations import geodesic_distance_deg, so3_exp, super_fibonacci_rotations
from cryospin_relion.model.volume import HartleyVolume


def test_rule_sends_a_wrong_basin_to_the_scan_and_keeps_a_right_one(shared_data, monkeypatch):
    """The ribosome map (box 32, 8 A/px, SNR 0.5, CTF), heads at the true pose turned by 6 deg (right basin)
    or by 90-180 deg (wrong basin): with the default fraction of the median fit at the true poses, the rule
    scans exactly the wrong ones, the scan brings them back near the truth, and the right ones keep their
    head-local pose."""
    import cryospin_relion.evaluate.blobs as blobs
    from cryospin_relion.evaluate.simulate import load_map

    n, B = 32, 24
    rib = torch.as_tensor(load_map(shared_data / "aspire" / "clean70SRibosome_vol_65p.mrc", n, 8.0, 4.0)).float()
    monkeypatch.setattr(blobs, "blob_volume", lambda n, seed=0: rib)
    d = blobs.simulate_blobs(n=n, N=B, apix=8.0, snr=0.5, max_shift_px=1.0, seed=4)
    vol = HartleyVolume(n)
    with torch.no_grad():
        vol.values.copy_(ht3_centered(d["vol"].double()).float() / n / d["sigma"])
    b = prepare_batch(torch.arange(B), d["images"], torch.full((B,), d["apix"]), CTF.from_arrays(d["ctf"]), n)
    R, t = d["R"].float(), d["t"].float()
    g = torch.Generator().manual_seed(1)
    axis = torch.nn.functional.normalize(torch.randn(B, 2, 3, generator=g), dim=-1)
    wrong = torch.arange(B) % 2 == 1
    angle = torch.where(wrong, torch.deg2rad(90 + 90 * torch.rand(B, generator=g)), torch.deg2rad(torch.tensor(6.0)))
    heads = so3_exp(axis * angle[:, None, None]) @ R[:, None]  # (B, 2 heads, 3, 3)
    ref = float(pose_fit(vol, b, R, t).median())
    search = SearchConfig()
    out = first_poses(vol, b, heads, t[:, None].expand(-1, 2, -1).clone(), g,
                      super_fibonacci_rotations(4608, dtype=torch.float32), search, 3.2,
                      SearchConfig().first_pose_scan_below * ref)
    assert torch.equal(out.scanned, wrong)
    # the scan's basin wins for (nearly) every wrong one; the right ones keep theirs
    assert float((out.source[wrong] == GLOBAL).float().mean()) >= 0.75
    assert not bool((out.source[~wrong] == GLOBAL).any())
    err = geodesic_distance_deg(out.rot.double(), R.double())
    assert float(err[wrong].median()) < 10 and float(err[~wrong].max()) < 10, err


@pytest.fixture(scope="module")
def tiny():
    return simulate_blobs(n=16, N=96, apix=6.0, snr=2.0, max_shift_px=1.0, seed=3)


def _cfg(**kw):
    base = dict(heads=2, epochs_amortized=1, min_epochs_amortized=1, epochs_autodecode=0, batch_size=32, pose_iters=2,
                seed=5, stage1_particles=40, stage1_trials=1)
    return AbinitConfig.from_dict(base | kw)


@pytest.mark.parametrize("mode", ["amortized", "search", "heads"])
def test_first_pose_pass_records_where_every_pose_came_from(tiny, mode):
    eng = AbinitEngine(tiny["images"], tiny["apix"], CTF.from_arrays(tiny["ctf"]), _cfg(first_pose=mode), "cpu")
    assert eng.run() == "done"
    h = json.loads(json.dumps(eng.history.to_json()))  # the history.json layout
    fp = h["first_poses"]
    assert fp["mode"] == mode and fp["particles"] == 96 - 40
    assert set(fp["sources"]) == set(WINNER_SOURCES) and sum(fp["sources"].values()) == 96 - 40
    assert fp["seconds"] == h["assign_s"] > 0
    scanned = {"search": 96 - 40, "heads": 0}.get(mode)
    if scanned is not None:
        assert fp["scanned"] == scanned
    else:
        assert 0 <= fp["scanned"] <= 96 - 40 and fp["scan_below"] > 0
    if mode == "heads":
        assert fp["sources"]["heads"] == 96 - 40
    # the report's page of winners shows these shares
    from cryospin_relion.report.plots import winner_sources

    shares = winner_sources(h)
    assert shares["first poses"] == {k: v / 56 for k, v in fp["sources"].items()} and "epoch 1" in shares
    # a checkpoint keeps the record
    eng2 = AbinitEngine(tiny["images"], tiny["apix"], CTF.from_arrays(tiny["ctf"]), _cfg(first_pose=mode), "cpu")
    eng2.load_state_dict(eng.state_dict())
    assert eng2.history.first_poses == eng.history.first_poses


def test_first_pose_config_is_validated():
    assert AbinitConfig().search.first_pose == "search"  # the heads are not good enough yet (config.py)
    assert AbinitConfig.from_dict({"first_pose": "amortized"}).search.first_pose == "amortized"
    with pytest.raises(InputError, match="first_pose: 'scan' is not one of amortized, search, heads"):
        AbinitConfig.from_dict({"first_pose": "scan"})
    for bad in (-0.1, 1.5):
        with pytest.raises(InputError, match="first_pose_scan_below"):
            AbinitConfig.from_dict({"first_pose_scan_below": bad})
    with pytest.raises(InputError, match="--first-pose-scan-below"):
        AbinitConfig().override(first_pose_scan_below=2.0)
    assert "first_pose" in AbinitConfig().resume_changes({"first_pose": "amortized"})  # not changed on --continue
