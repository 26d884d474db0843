"""Engine unit tests: winner takes all, exponential-map updates, per-row Adam, determinism, resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from cryospin_relion.evaluate.blobs import simulate_blobs as simulate

from cryospin_relion.config import AbinitConfig, ScheduleConfig
from cryospin_relion.engine.forward import prepare_batch
from cryospin_relion.engine.run import AbinitEngine
from cryospin_relion.engine.schedule import crop_for_epoch
from cryospin_relion.engine.stage1 import multihead_losses, winner_takes_all
from cryospin_relion.engine.stage2 import pose_loss
from cryospin_relion.geometry.ctf import CTF
from cryospin_relion.geometry.fourier import ht3_centered
from cryospin_relion.geometry.rotations import geodesic_distance_deg, random_rotations, so3_exp
from cryospin_relion.model.encoder import PoseEncoder
from cryospin_relion.model.pose_table import PoseTable
from cryospin_relion.model.volume import HartleyVolume


@pytest.fixture(scope="module")
def tiny():
    return simulate(n=16, N=96, apix=6.0, snr=2.0, max_shift_px=1.0, seed=3)


def _true_volume(d, n) -> HartleyVolume:
    vol = HartleyVolume(n)
    with torch.no_grad():
        vol.values.copy_(ht3_centered(d["vol"].double()).float() / n / d["sigma"])
    return vol


def _ctf(d) -> CTF:
    return CTF.from_arrays(d["ctf"])


def _batch(d, idx, crop=None):
    n = d["images"].shape[-1]
    ctf = CTF.from_arrays(d["ctf"])[idx]
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
    cfg = ScheduleConfig(c2f_start=0.5, c2f_epochs=4)
    assert [crop_for_epoch(cfg, 32, e) for e in range(6)] == [16, 20, 24, 28, 32, 32]
    assert crop_for_epoch(ScheduleConfig(coarse_to_fine=False), 32, 0) == 32


def _cfg(**kw):
    base = dict(heads=2, epochs_amortized=2, min_epochs_amortized=2, epochs_autodecode=1, batch_size=32,
                pose_iters=2, seed=5)
    base.update(kw)
    return AbinitConfig.from_dict(base)


def test_same_seed_same_result(tiny):
    outs = []
    for _ in range(2):
        eng = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), _cfg(), "cpu")
        assert eng.run() == "done"
        outs.append((eng.final_poses(), eng.decoder_map()))
    assert np.array_equal(outs[0][0][0], outs[1][0][0])
    assert np.array_equal(outs[0][0][1], outs[1][0][1])
    assert torch.equal(outs[0][1], outs[1][1])
    eng3 = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), _cfg(seed=6), "cpu")
    eng3.run()
    assert not np.array_equal(eng3.final_poses()[0], outs[0][0][0])


@pytest.mark.parametrize("stop_after", [2, 5])  # mid stage 1 (epoch 1) / in stage 2
def test_resume_is_identical(tiny, stop_after):
    ref = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), _cfg(), "cpu")
    ref.run()
    eng = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), _cfg(), "cpu")
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
    eng2 = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), _cfg(), "cpu")
    eng2.load_state_dict(state)
    assert eng2.run() == "done"
    assert np.array_equal(eng2.final_poses()[0], ref.final_poses()[0])
    assert torch.equal(eng2.decoder_map(), ref.decoder_map())
    assert eng2.history.column("loss") == ref.history.column("loss")


def test_history_keys(tiny):
    eng = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), _cfg(), "cpu")
    eng.run()
    h = eng.history.to_json()  # the history.json layout that the report reads
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
    assert (out.overall == 3).all()  # index M + 0: the extra candidate won every image
    assert torch.allclose(out.rot, R_true) and torch.allclose(out.shift, t_true)
    with torch.no_grad():
        rot1, _ = enc(b.images)
    d1 = ((rot1 - R_true[:, None]) ** 2).sum((-1, -2))
    ar = torch.arange(8)
    assert float(d1[ar, j0].mean()) < float(d0[ar, j0].mean())  # the nearest heads moved toward the winner


def test_volume_trained_by_overall_winner(tiny):
    """The volume gradient of the exploration step equals that of the loss at the winning extra pose
    (the heads' losses do not reach the volume when a non-head candidate wins)."""
    from cryospin_relion.engine.forward import per_image_loss, render
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
    per = per_image_loss(render(vol.slices(R_true, freqs=b.mask.freqs), b.ctf, t_true, b.mask), b.target, "l1")
    per.mean().backward()
    assert torch.allclose(g_step, vol.values.grad, atol=1e-6)


def test_explore_off_is_pure_wta(tiny):
    """explore_candidates=0: no search, overall winner = winning head, memory holds the winning heads."""
    eng = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), _cfg(explore_candidates=0), "cpu")
    b = eng.batch(torch.arange(4), 16)
    assert eng.explore(b, 0) is None
    assert torch.equal(eng.memory.rotations, torch.eye(3).repeat(eng.N, 1, 1))
    eng.run()
    s = eng.history.column("winner_source_share")
    assert s[0] == {"heads": 1.0, "memory": 0.0, "local": 0.0, "global": 0.0} and s[-1] is None


def test_search_finds_true_pose_on_known_map():
    """The gradient-free search (grid scan + local rounds) finds poses near the truth with the true map."""
    from cryospin_relion.config import SearchConfig
    from cryospin_relion.engine.stage1 import search_poses
    from cryospin_relion.geometry.rotations import super_fibonacci_rotations

    n = 16
    d = simulate(n=16, N=16, apix=6.0, snr=1e6, max_shift_px=1.0, seed=4)
    vol = _true_volume(d, n)
    idx = torch.arange(16)
    b = _batch(d, idx)
    g = torch.Generator().manual_seed(0)
    seeds_R = random_rotations(16, g).float()[:, None]
    seeds_t = d["t"][idx].float()[:, None]
    search = SearchConfig(explore_top=8, explore_rounds=3, explore_local=8, explore_local_deg=10.0,
                          explore_shift_px=0.0, explore_grid_crop=0, explore_shift_range=0.0, explore_shift_step=1.0)
    out = search_poses(vol, b, seeds_R, seeds_t, g, super_fibonacci_rotations(2000, dtype=torch.float32), search, 1.6)
    err = geodesic_distance_deg(out.rot.double(), d["R"][idx])
    assert float(err.median()) < 5.0, err


# -- stage-1 subset, starts, low-resolution scan over rotations x shifts --------------------------------

def test_recrop_equals_a_batch_prepared_at_the_smaller_box(tiny):
    from cryospin_relion.engine.forward import recrop

    idx = torch.arange(5)
    big, small = _batch(tiny, idx, 16), _batch(tiny, idx, 10)
    r = recrop(big, 10)
    assert r.crop == 10 and r.mask is small.mask
    assert torch.allclose(r.target, small.target, atol=1e-6)
    assert torch.allclose(r.ctf, small.ctf, atol=1e-6)
    assert recrop(big, 16) is big


@pytest.mark.parametrize("crop,radius", [(16, 1.0), (12, 1.0), (16, 0.6)])
def test_masked_forward_equals_the_whole_grid(tiny, crop, radius):
    """The engine's losses at the mask's frequencies only (slices, CTF, shift, loss per frequency) equal the
    whole crop x crop grid's (``extract_slices``, ``hartley_shift`` with its flips) restricted by the boolean
    mask, values and gradients (volume, rotations, shifts)."""
    from cryospin_relion.engine.forward import crop_mask, ctf_cropped, per_image_loss, render
    from cryospin_relion.geometry.fourier import crop_centered_2d, ht2_centered
    from cryospin_relion.geometry.shifts import hartley_shift

    n, idx = 16, torch.arange(6)
    vol = _true_volume(tiny, n)
    b = prepare_batch(idx, tiny["images"][idx], torch.full((6,), tiny["apix"]), _ctf(tiny)[idx], crop, radius)
    R = (random_rotations(6, torch.Generator().manual_seed(3), dtype=torch.float32)).requires_grad_()
    t = (tiny["t"][idx].float() + 0.3).requires_grad_()
    masked = per_image_loss(render(vol.slices(R, freqs=b.mask.freqs), b.ctf, t, b.mask), b.target, "l1")
    grads = torch.autograd.grad(masked.sum(), (vol.values, R, t))
    mask = crop_mask(n, crop, radius)
    ctf = ctf_cropped(n, crop, torch.full((6,), tiny["apix"]), _ctf(tiny)[idx])
    model = hartley_shift(vol.slices(R, crop=crop) * ctf, t * (crop / n))  # the crop's pixels: t * crop / n
    target = crop_centered_2d(ht2_centered(tiny["images"][idx]), crop) / n
    whole = (model - target)[:, mask].abs().mean(-1)
    grads_whole = torch.autograd.grad(whole.sum(), (vol.values, R, t))
    assert b.target.shape == (6, int(mask.sum()))
    assert torch.allclose(masked, whole, rtol=1e-5, atol=1e-7)
    for g, w in zip(grads, grads_whole):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6 * float(w.abs().max()))


def test_grid_scores_over_shifts_rank_like_the_l2_loss(tiny):
    """grid_scores (B, T, G) = K * per-image L2 loss + a per-image constant, for every rotation and shift."""
    from cryospin_relion.engine.forward import per_image_loss, render
    from cryospin_relion.engine.stage1 import grid_scores, shift_offsets

    n = 16
    vol = _true_volume(tiny, n)
    b = _batch(tiny, torch.arange(3), 12)
    G = random_rotations(5, torch.Generator().manual_seed(1), dtype=torch.float32)
    ts = tiny["t"][:3, None].float() + shift_offsets(1.0, 1.0)[None]  # (3, 9, 2)
    assert ts.shape == (3, 9, 2)
    sc = grid_scores(vol, b, G, ts)  # (3, 9, 5)
    K = b.target.shape[-1]
    for i in range(3):
        sl = vol.slices(G, freqs=b.mask.freqs)
        ref = torch.stack([per_image_loss(render(sl, b.ctf[i:i + 1].expand(5, -1), ts[i, t][None].expand(5, 2), b.mask),
                                          b.target[i:i + 1], "l2") for t in range(9)])  # (9, 5)
        diff = sc[i] - K * ref
        assert float(diff.max() - diff.min()) < 1e-3 * float(sc[i].abs().max())
    # the true pose at the true shift scores best among the 9 shifts
    sc_true = grid_scores(vol, _batch(tiny, torch.arange(1), 12), tiny["R"][:1].float(), ts[:1])
    assert int(sc_true[0, :, 0].argmin()) == 4  # offset (0, 0)
    # sections made once (scan_slices) and reused give the same scores
    from cryospin_relion.engine.stage1 import scan_slices
    assert torch.allclose(grid_scores(vol, b, G, ts, scan=scan_slices(vol, G, b)), sc)


def test_stage_two_grows_the_fourier_box():
    cfg = ScheduleConfig(stage1_max_crop=32, c2f_stage2_epochs=2, c2f_start=0.375, c2f_epochs=4)
    assert [crop_for_epoch(cfg, 64, e) for e in range(6)] == [12, 16, 22, 28, 32, 32]  # capped at 32
    assert [crop_for_epoch(cfg, 64, e, switch_epoch=5) for e in (5, 6, 7)] == [48, 64, 64]
    assert crop_for_epoch(ScheduleConfig(), 32, 0, switch_epoch=0) == 32  # box <= cap: full box in stage 2


def test_stage1_subset_and_first_poses_of_the_others(tiny):
    eng = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), _cfg(stage1_particles=40, stage1_trials=1),
                       "cpu")
    assert len(eng.s1_idx) == 40 and len(torch.unique(eng.s1_idx)) == 40
    R0 = eng.memory.rotations.clone()
    out = torch.ones(eng.N, dtype=torch.bool)
    out[eng.s1_idx] = False
    seen = []
    orig = eng.batch

    def spy(idx, crop, images=None):
        if eng.stage == 1 and eng.resumable:
            seen.append(idx.clone())
        return orig(idx, crop, images)

    eng.batch = spy
    assert eng.run() == "done"
    # stage-1 batches only held subset particles until the first-pose pass at the switch
    first = torch.cat(seen[:2])
    assert bool(torch.isin(first, eng.s1_idx).all())
    # every particle outside the subset got a pose from the pass (not its random start)
    assert float(geodesic_distance_deg(R0[out].double(), eng.table.rotations[out].double()).min()) > 0
    assert eng.history.assign_s is not None and eng.history.assign_s > 0


def test_first_pose_pass_makes_the_scan_sections_once(tiny, monkeypatch):
    """The volume is fixed during the first-pose pass: one set of global-scan sections serves all its batches."""
    import cryospin_relion.engine.run as run_mod

    calls = {"pass": 0, "in_pass": False}
    made = run_mod.scan_slices
    assign = AbinitEngine._assign_unvisited

    def count(*a, **k):
        calls["pass"] += calls["in_pass"]
        return made(*a, **k)

    def spy(self):
        calls["in_pass"] = True
        try:
            return assign(self)
        finally:
            calls["in_pass"] = False

    monkeypatch.setattr(run_mod, "scan_slices", count)
    monkeypatch.setattr(AbinitEngine, "_assign_unvisited", spy)
    eng = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), _cfg(stage1_particles=20, stage1_trials=1,
                                                                      batch_size=8), "cpu")
    assert eng.run() == "done"
    assert eng.history.first_poses.particles == eng.N - 20 > 8  # several batches
    assert calls["pass"] == 1


def test_several_starts_keep_the_lowest_loss(tiny):
    cfg = _cfg(stage1_trials=3, stage1_trial_epochs=1, epochs_amortized=3, min_epochs_amortized=3)
    eng = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), cfg, "cpu")
    seen = []
    assert eng.run(on_trial_epoch_end=lambda e: seen.append((e.trial, e.history.last.loss))) == "done"
    tr = eng.history.trials
    assert [t for t, _ in seen] == [0, 1, 2] and tr.loss == [l for _, l in seen]
    assert tr.chosen == int(np.argmin(tr.loss)) == eng.trial
    assert eng.history.epochs[0].loss == tr.loss[tr.chosen]  # the chosen start's own first epoch
    # a stop during the starts resets the engine to the beginning (nothing half-chosen is checkpointed)
    eng2 = AbinitEngine(tiny["images"], tiny["apix"], _ctf(tiny), cfg, "cpu")
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] >= 4  # in the second start

    assert eng2.run(should_stop=stop) == "stopped"
    assert (eng2.epoch, eng2.batch_pos, eng2.trial, eng2.history.column("epoch")) == (0, 0, 0, [])
