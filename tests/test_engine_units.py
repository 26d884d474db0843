"""Engine unit tests: winner takes all, exponential-map updates, per-row Adam, determinism, resume."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import blob_volume, simulate  # noqa: E402

from cryospin_relion.config import AbinitConfig  # noqa: E402
from cryospin_relion.engine.losses import prepare_batch  # noqa: E402
from cryospin_relion.engine.run import AbinitEngine, crop_for_epoch  # noqa: E402
from cryospin_relion.engine.stage1 import multihead_losses, winner_takes_all  # noqa: E402
from cryospin_relion.engine.stage2 import pose_loss  # noqa: E402
from cryospin_relion.geometry.fourier import ht3_centered  # noqa: E402
from cryospin_relion.geometry.rotations import geodesic_distance_deg, random_rotations, so3_exp  # noqa: E402
from cryospin_relion.model.encoder import PoseEncoder  # noqa: E402
from cryospin_relion.model.pose_table import PoseTable  # noqa: E402
from cryospin_relion.model.volume import HartleyVolume  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return simulate(n=16, N=96, apix=6.0, snr=2.0, max_shift_px=1.0, seed=3)


def _true_volume(d, n) -> HartleyVolume:
    vol = HartleyVolume(n)
    with torch.no_grad():
        vol.values.copy_(ht3_centered(d["vol"].double()).float() / n / d["sigma"])
    return vol


def _batch(d, idx, crop=None):
    n = d["images"].shape[-1]
    ctf = {k: v[idx].float() for k, v in d["ctf"].items()}
    return prepare_batch(idx, d["images"][idx], torch.full((len(idx),), d["apix"]), ctf, crop or n)


def test_winner_takes_all_min_and_gradient():
    x = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 1.0]], requires_grad=True)
    loss, win = winner_takes_all(x * 2)
    assert win.tolist() == [1, 0]
    assert float(loss.detach()) == pytest.approx((2.0 + 1.0) / 2)
    loss.backward()
    assert x.grad.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_only_winning_head_gets_gradient(tiny):
    torch.manual_seed(0)
    n = 16
    enc = PoseEncoder(n, heads=4, max_shift=1.6, preset="fast")
    vol = _true_volume(tiny, n)
    b = _batch(tiny, torch.arange(2))
    per, rot, shift = multihead_losses(enc, vol, b)
    loss, win = winner_takes_all(per)
    assert torch.equal(win, per.detach().argmin(1))
    loss.backward()
    for j, head in enumerate(enc.heads_mlp):
        g = sum(float(p.grad.abs().sum()) for p in head.parameters() if p.grad is not None)
        if j in win.tolist():
            assert g > 0
        else:
            assert g == 0.0, f"head {j} did not win but got gradient"


def test_fold_in_is_left_multiplication():
    """A_new = so3_exp(delta) @ A (image-frame perturbation); first Adam step = lr * sign(grad)."""
    g = torch.Generator().manual_seed(0)
    R = random_rotations(4, g).float()
    table = PoseTable(4, lr_rot=0.05, lr_shift=0.1, betas=(0.9, 0.9), eps=1e-12)
    table.set(R, torch.zeros(4, 2))
    idx = torch.tensor([1, 3])
    delta = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.05, -0.1]])
    Rp, _ = table.poses(idx, delta)
    assert torch.allclose(Rp, so3_exp(delta) @ R[idx], atol=1e-6)
    gd = torch.tensor([[1.0, -2.0, 0.5], [-0.3, 0.2, 4.0]])
    table.step(idx, gd, torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
    expect = so3_exp(-0.05 * torch.sign(gd)) @ R[idx]
    assert torch.allclose(table.rotations[idx], expect, atol=1e-5)
    assert torch.allclose(table.shifts[idx], torch.tensor([[-0.1, 0.1], [0.0, -0.1]]), atol=1e-6)
    assert torch.allclose(table.rotations[[0, 2]], R[[0, 2]])


def test_per_row_adam_moves_only_batch_rows():
    table = PoseTable(5, lr_rot=0.05, lr_shift=0.05)
    table.set(random_rotations(5, torch.Generator().manual_seed(1)).float(), torch.zeros(5, 2))
    a = torch.tensor([0, 1])
    for _ in range(3):
        table.step(a, torch.ones(2, 3), torch.ones(2, 2))
    before = (table.rotations.clone(), table.shifts.clone())
    table.step(torch.tensor([2]), torch.ones(1, 3), torch.ones(1, 2))
    assert torch.equal(table.rotations[[0, 1, 3, 4]], before[0][[0, 1, 3, 4]])
    assert torch.equal(table.shifts[[0, 1, 3, 4]], before[1][[0, 1, 3, 4]])
    assert not torch.equal(table.rotations[2], before[0][2])
    assert table.steps.tolist() == [3, 3, 1, 0, 0]


def test_pose_gradient_reduces_loss_on_known_map():
    n = 16
    tiny = simulate(n=16, N=32, apix=6.0, snr=1e6, max_shift_px=1.0, seed=3)  # noise-free: the map is known
    vol = _true_volume(tiny, n)
    idx = torch.arange(32)
    b = _batch(tiny, idx)
    g = torch.Generator().manual_seed(2)
    R0 = so3_exp(torch.randn(32, 3, generator=g, dtype=torch.float64) * 0.1) @ tiny["R"][idx]
    table = PoseTable(32, lr_rot=0.02, lr_shift=0.05)
    table.set(R0.float(), tiny["t"][idx].float())
    grid = vol.grid().detach()
    loss0 = float(pose_loss(grid, vol, table, b).mean())
    err0 = float(geodesic_distance_deg(table.rotations.double(), tiny["R"][idx]).median())
    for _ in range(30):
        delta, dshift = table.perturbation(idx)
        per = pose_loss(grid, vol, table, b, delta, dshift)
        gd, gs = torch.autograd.grad(per.sum(), (delta, dshift))
        table.step(idx, gd, gs)
    loss1 = float(pose_loss(grid, vol, table, b).mean())
    err1 = float(geodesic_distance_deg(table.rotations.double(), tiny["R"][idx]).median())
    assert loss1 < loss0
    assert err1 < 0.5 * err0, (err0, err1)


def test_coarse_to_fine_schedule():
    cfg = AbinitConfig(c2f_start=0.5, c2f_epochs=4)
    assert [crop_for_epoch(cfg, 32, e) for e in range(6)] == [16, 20, 24, 28, 32, 32]
    assert crop_for_epoch(AbinitConfig(coarse_to_fine=False), 32, 0) == 32


def _cfg(**kw):
    base = dict(heads=2, epochs_amortized=2, min_epochs_amortized=2, epochs_autodecode=1, batch_size=32,
                pose_iters=2, seed=5)
    base.update(kw)
    return AbinitConfig(**base)


def test_same_seed_same_result(tiny):
    outs = []
    for _ in range(2):
        eng = AbinitEngine(tiny["images"], tiny["apix"], tiny["ctf"], _cfg(), "cpu", progress=False)
        assert eng.run() == "done"
        outs.append((eng.final_poses(), eng.decoder_map()))
    assert np.array_equal(outs[0][0][0], outs[1][0][0])
    assert np.array_equal(outs[0][0][1], outs[1][0][1])
    assert torch.equal(outs[0][1], outs[1][1])
    eng3 = AbinitEngine(tiny["images"], tiny["apix"], tiny["ctf"], _cfg(seed=6), "cpu", progress=False)
    eng3.run()
    assert not np.array_equal(eng3.final_poses()[0], outs[0][0][0])


@pytest.mark.parametrize("stop_after", [2, 5])  # mid stage 1 (epoch 1) / in stage 2
def test_resume_is_identical(tiny, stop_after):
    ref = AbinitEngine(tiny["images"], tiny["apix"], tiny["ctf"], _cfg(), "cpu", progress=False)
    ref.run()
    eng = AbinitEngine(tiny["images"], tiny["apix"], tiny["ctf"], _cfg(), "cpu", progress=False)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] >= stop_after

    assert eng.run(should_stop=stop) == "stopped"
    buf = io.BytesIO()
    torch.save(eng.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # resumed RNG state must not depend on what happened in between
    eng2 = AbinitEngine(tiny["images"], tiny["apix"], tiny["ctf"], _cfg(), "cpu", progress=False)
    eng2.load_state_dict(state)
    assert eng2.run() == "done"
    assert np.array_equal(eng2.final_poses()[0], ref.final_poses()[0])
    assert torch.equal(eng2.decoder_map(), ref.decoder_map())
    assert eng2.history["loss"] == ref.history["loss"]


def test_history_keys(tiny):
    eng = AbinitEngine(tiny["images"], tiny["apix"], tiny["ctf"], _cfg(), "cpu", progress=False)
    eng.run()
    h = eng.history
    assert h["stage"] == [1, 1, 2] and h["switch_epoch"] == 2
    assert len(h["head_win_share"][0]) == 2 and h["head_win_share"][2] is None
    assert h["time_s"] == sorted(h["time_s"])


# -- stage-1 exploration ------------------------------------------------------------------------------

def test_exploration_winner_beats_bad_heads_and_distils(tiny):
    """An extra candidate at the true pose wins over the heads; the volume is trained at it and the head
    nearest to it (chordal distance) is pulled toward it by the distillation term."""
    from cryospin_relion.engine.stage1 import nearest_head, stage1_step

    torch.manual_seed(0)
    n = 16
    enc = PoseEncoder(n, heads=3, max_shift=1.6, preset="fast")
    vol = _true_volume(tiny, n)
    idx = torch.arange(8)
    b = _batch(tiny, idx)
    R_true, t_true = tiny["R"][idx].float(), tiny["t"][idx].float()
    opt_e = torch.optim.Adam(enc.parameters(), lr=1e-3)
    opt_v = torch.optim.SGD(vol.parameters(), lr=0.0)  # keep the true map
    with torch.no_grad():
        rot0, _ = enc(b.images)
    d0, j0 = nearest_head(rot0, R_true)
    out = stage1_step(enc, vol, opt_e, opt_v, b, "l1", extra_rot=R_true[:, None], extra_shift=t_true[:, None],
                      distill_weight=10.0)
    assert (out["overall"] == 3).all()  # index M + 0: the extra candidate won every image
    assert torch.allclose(out["rot"], R_true) and torch.allclose(out["shift"], t_true)
    with torch.no_grad():
        rot1, _ = enc(b.images)
    d1 = ((rot1 - R_true[:, None]) ** 2).sum((-1, -2))
    ar = torch.arange(8)
    assert float(d1[ar, j0].mean()) < float(d0[ar, j0].mean())  # the nearest heads moved toward the winner


def test_volume_trained_by_overall_winner(tiny):
    """The volume gradient of the exploration step equals that of the loss at the winning extra pose
    (the heads' losses do not reach the volume when a non-head candidate wins)."""
    from cryospin_relion.engine.losses import per_image_loss, render
    from cryospin_relion.engine.stage1 import stage1_step

    torch.manual_seed(0)
    n = 16
    enc = PoseEncoder(n, heads=2, max_shift=1.6, preset="fast")
    vol = _true_volume(tiny, n)
    idx = torch.arange(6)
    b = _batch(tiny, idx)
    R_true, t_true = tiny["R"][idx].float(), tiny["t"][idx].float()
    stage1_step(enc, vol, torch.optim.SGD(enc.parameters(), lr=0.0), torch.optim.SGD(vol.parameters(), lr=0.0), b,
                "l1", extra_rot=R_true[:, None], extra_shift=t_true[:, None], distill_weight=0.0)
    g_step = vol.values.grad.clone()
    vol.values.grad = None
    per = per_image_loss(render(vol.slices(R_true), b.ctf, t_true, n), b.target, b.mask, "l1")
    per.mean().backward()
    assert torch.allclose(g_step, vol.values.grad, atol=1e-6)


def test_explore_off_is_pure_wta(tiny):
    """explore_candidates=0: no search, overall winner = winning head, memory holds the winning heads."""
    eng = AbinitEngine(tiny["images"], tiny["apix"], tiny["ctf"], _cfg(explore_candidates=0), "cpu", progress=False)
    b = eng.batch(torch.arange(4), 16)
    assert eng.explore(b, 0) is None
    assert torch.equal(eng.win_R, torch.eye(3).repeat(eng.N, 1, 1))
    eng.run()
    s = eng.history["winner_source_share"]
    assert s[0] == {"heads": 1.0, "memory": 0.0, "local": 0.0, "global": 0.0} and s[-1] is None


def test_search_finds_true_pose_on_known_map():
    """The gradient-free search (grid scan + local rounds) finds poses near the truth with the true map."""
    from cryospin_relion.engine.stage1 import search_poses, super_fibonacci_rotations

    n = 16
    d = simulate(n=16, N=16, apix=6.0, snr=1e6, max_shift_px=1.0, seed=4)
    vol = _true_volume(d, n)
    idx = torch.arange(16)
    b = _batch(d, idx)
    g = torch.Generator().manual_seed(0)
    seeds_R = random_rotations(16, g).float()[:, None]
    seeds_t = d["t"][idx].float()[:, None]
    out = search_poses(vol, b, seeds_R, seeds_t, g, super_fibonacci_rotations(2000), 8, 3, 8, 10.0, 0.0, 1.6)
    err = geodesic_distance_deg(out["rot"].double(), d["R"][idx])
    assert float(err.median()) < 5.0, err


def test_super_fibonacci_is_near_uniform():
    from cryospin_relion.engine.stage1 import super_fibonacci_rotations

    R = super_fibonacci_rotations(1000).double()
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(1000, 3, 3), atol=1e-6)
    probe = random_rotations(200, torch.Generator().manual_seed(0))
    nearest = geodesic_distance_deg(probe[:, None], R[None]).min(1).values
    assert float(nearest.max()) < 20.0  # covering radius of ~1000 near-uniform rotations is ~12 deg
