"""K classes in the engine (engine/classes.py, model/class_volumes.py): assignment, annealing, re-seeding,
stage-2 moves, the checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from cryospin_relion.config import AbinitConfig, ScheduleConfig
from cryospin_relion.engine.classes import (class_weights, duplicate_classes, reform_epoch, relation_spread_deg,
                                            reseed_plan, similarity_at)
from cryospin_relion.engine.run import AbinitEngine
from cryospin_relion.evaluate.blobs import simulate_blobs
from cryospin_relion.geometry.ctf import CTF
from cryospin_relion.geometry.fourier import ht3_centered
from cryospin_relion.geometry.rotations import geodesic_distance_deg, random_rotations, so3_exp
from cryospin_relion.model.class_volumes import ClassVolumes
from cryospin_relion.model.volume import HartleyVolume


@pytest.fixture(scope="module")
def mixture():
    """60 particles of one blob map and 40 of another (box 16), with their CTFs and true poses."""
    a = simulate_blobs(16, 60, apix=6.0, snr=2.0, max_shift_px=1.0, seed=3)
    b = simulate_blobs(16, 40, apix=6.0, snr=2.0, max_shift_px=1.0, seed=11)
    ctf = CTF.from_arrays({k: torch.cat([getattr(a["ctf"], k), getattr(b["ctf"], k)]) for k, _ in a["ctf"].items()})
    return {"images": torch.cat([a["images"], b["images"]]), "ctf": ctf, "R": torch.cat([a["R"], b["R"]]),
            "t": torch.cat([a["t"], b["t"]]), "truth": np.r_[np.zeros(60, int), np.ones(40, int)],
            "vols": [a["vol"] / a["sigma"], b["vol"] / b["sigma"]]}


def _cfg(**kw):
    base = dict(heads=2, classes=2, epochs_amortized=2, min_epochs_amortized=2, epochs_autodecode=2, batch_size=32,
                pose_iters=2, seed=5, stage1_trials=1, explore_candidates=256, class_anneal_epochs=1)
    base.update(kw)
    return AbinitConfig.from_dict(base)


def test_similarity_anneals_to_hard():
    cfg = ScheduleConfig(class_similarity=0.6, class_anneal_epochs=3)
    assert [round(similarity_at(cfg, e), 6) for e in range(5)] == [0.6, 0.4, 0.2, 0.0, 0.0]
    assert similarity_at(ScheduleConfig(class_anneal_epochs=0), 0) == 0.0
    losses = torch.tensor([[0.3, 0.1, 0.2], [0.5, 0.6, 0.7]])
    w = class_weights(losses, 0.6)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert torch.allclose(w[0], torch.tensor([0.2, 0.6, 0.2]))  # 0.6 / 3 to each, 0.4 more to the best
    assert torch.equal(class_weights(losses, 0.0), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(class_weights(losses, 1.0), torch.full((2, 3), 1 / 3))


def test_reseed_plan_splits_the_largest_class():
    assert reseed_plan([0, 100, 40], 20) == [(0, 1)]
    assert reseed_plan([3, 2, 95], 20) == [(1, 2), (0, 2)]  # smallest first; the largest is split again
    assert reseed_plan([30, 40, 30], 20) == []
    assert reseed_plan([5, 30, 0], 20) == []  # nothing large enough to split (< 2 x the minimum)


def _jitter(R: torch.Tensor, deg: float, seed: int) -> torch.Tensor:
    w = torch.randn(len(R), 3, generator=torch.Generator().manual_seed(seed), dtype=R.dtype)
    return so3_exp(w * (np.radians(deg) / np.sqrt(3))) @ R


def test_duplicate_classes_are_found_by_their_pose_relation():
    g = torch.Generator().manual_seed(0)
    A = random_rotations(300, g)
    R = random_rotations(1, g)[0]
    M = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=A.dtype))
    same, mirrored = _jitter(A @ R.T, 5.0, 1), _jitter(M @ A @ M @ R.T, 5.0, 2)
    s = relation_spread_deg(A, same)
    assert s[0] < 8 and s[1] > 60  # one fixed rotation, the same hand
    s = relation_spread_deg(A, mirrored)
    assert s[1] < 8 and s[0] > 60
    s = relation_spread_deg(A, random_rotations(300, g))
    assert min(s) > 90  # unrelated poses: spread over SO(3)

    cls = torch.tensor([0] * 100 + [1] * 120 + [2] * 80)
    rots = [A, same, random_rotations(300, g)]  # classes 0 and 1: one structure; class 2 another
    pairs = duplicate_classes(rots, cls, 30.0)
    assert [(d, k) for d, k, _ in pairs] == [(0, 1)] and pairs[0][2] < 8  # the smaller one is emptied
    assert duplicate_classes([A, mirrored, rots[2]], cls, 30.0)[0][:2] == (0, 1)
    assert duplicate_classes(rots, cls, 3.0) == []  # the threshold decides
    # one member set agreeing is not enough: class 2's members are posed at random in class 0
    half = torch.where((cls == 2)[:, None, None], random_rotations(300, g), A @ R.T)
    assert duplicate_classes([A, rots[2], half], cls, 30.0) == []


def test_class_volumes_slice_each_image_from_its_class():
    torch.manual_seed(0)
    vols = [HartleyVolume(12) for _ in range(3)]
    for v in vols:
        with torch.no_grad():
            v.values.normal_()
    cv = ClassVolumes(vols)
    R = random_rotations(7, torch.Generator().manual_seed(1), dtype=torch.float32)
    cls = torch.tensor([2, 0, 0, 1, 2, 0, 1])
    sl = cv.slices(R, crop=8, cls=cls)
    for i in range(7):
        assert torch.allclose(sl[i], vols[int(cls[i])].slices(R[i:i + 1], crop=8)[0], atol=1e-6)
    sl.square().sum().backward()  # class 1's two images only reach class 1's volume
    assert all(v.values.grad is not None and v.values.grad.abs().sum() > 0 for v in vols)
    for v in vols:
        v.values.grad = None
    cv.slices(R[:3], crop=8, cls=torch.tensor([2, 0, 0])).sum().backward()
    assert vols[1].values.grad is None or not vols[1].values.grad.any()
    cv.split(0, 1)
    assert torch.allclose(vols[1].grid(), 0.5 * vols[0].grid())


def test_stage2_moves_particles_to_the_class_that_fits(mixture):
    """The true maps as the two classes, the true poses in the pose table and memories, every particle in the
    wrong class: one move pass puts (nearly) every particle in its own class."""
    d = mixture
    eng = AbinitEngine(d["images"], torch.tensor(6.0), d["ctf"], _cfg(), "cpu")
    for k, v in enumerate(d["vols"]):
        with torch.no_grad():
            eng.volume[k].values.copy_(ht3_centered(v.double()).float() / 16)
    R, t = d["R"].float(), d["t"].float()
    eng.table.set(R, t)
    for m in eng.memories:
        m.rotations.copy_(R)
        m.shifts.copy_(t)
    eng.classes = torch.from_numpy(1 - d["truth"])
    eng.stage, eng.epoch, eng.history.switch_epoch = 2, 4, 2  # full box
    moved = eng._move_classes()
    assert moved >= 90  # the others fit both maps about equally (blobs at box 16)
    assert np.mean(eng.final_classes() == d["truth"]) >= 0.9
    i = int(np.flatnonzero(eng.final_classes() == d["truth"])[0])
    # its new class's remembered pose, refined locally
    assert float(geodesic_distance_deg(eng.table.rotations[i].double(), R[i].double())) < 5
    assert int(eng.table.steps[i]) == 0


def test_a_duplicate_class_is_emptied_after_the_annealing(mixture):
    """Both classes hold map A (class 1 turned by R, so its poses are A_i R^T) and its particles are split
    between them: class 1 (the smaller) is emptied, its particles join class 0; nothing is emptied with
    ``class_duplicate_deg: 0``."""
    d = mixture
    R = random_rotations(1, torch.Generator().manual_seed(4), dtype=torch.float32)[0]
    for deg in (30.0, 0.0):
        eng = AbinitEngine(d["images"], torch.tensor(6.0), d["ctf"], _cfg(class_duplicate_deg=deg), "cpu")
        for k in range(2):
            with torch.no_grad():
                eng.volume[k].values.copy_(ht3_centered(d["vols"][0].double()).float() / 16)
        Ra = d["R"].float()
        eng.memories[0].rotations.copy_(Ra)
        eng.memories[1].rotations.copy_(_jitter(Ra @ R.T, 4.0, 7))
        eng.classes = torch.from_numpy((np.arange(100) % 5 == 0).astype(np.int64))  # 80 / 20
        before = eng.volume[1].grid().detach().clone()
        eng._empty_duplicate_classes(epoch=1)
        if deg:
            assert eng.class_sizes() == [100, 0]
            assert not eng.volume[1].grid().any() and eng.volume[0].grid().any()
            assert eng.history.class_merges == [{"epoch": 1, "class": 1, "into_class": 0,
                                                 "spread_deg": eng.history.class_merges[0]["spread_deg"]}]
            assert eng.history.to_json()["class_merges"][0]["spread_deg"] < 10
        else:
            assert eng.class_sizes() == [80, 20] and torch.equal(eng.volume[1].grid(), before)


def test_reform_epoch_follows_the_annealing_and_the_starts():
    assert reform_epoch(ScheduleConfig(class_anneal_epochs=4, stage1_trials=3, stage1_trial_epochs=3)) == 4
    assert reform_epoch(ScheduleConfig(class_anneal_epochs=2, stage1_trials=3, stage1_trial_epochs=3)) == 4
    assert reform_epoch(ScheduleConfig(class_anneal_epochs=2, stage1_trials=1)) == 2
    assert reform_epoch(ScheduleConfig(class_reform_epochs=0)) is None


def test_a_class_that_did_not_form_is_formed_again_alone(mixture):
    """Class 0 (the largest) is map A at the true poses of its particles; class 1, holding B's particles, is
    empty (formed nothing). Formed again alone, class 1 fits its particles better and replaces the empty one
    (its volume, its particles' poses in it, fresh Adam state); class 0 is not re-formed. When class 1 is map B
    at the true poses, it is kept."""
    d = mixture
    for formed in (False, True):
        eng = AbinitEngine(d["images"], torch.tensor(6.0), d["ctf"], _cfg(class_reform_epochs=2), "cpu")
        with torch.no_grad():
            # / 128: near the amplitude that fits the images best (the parameters are scaled by the preconditioner)
            for k in range(2):
                eng.volume[k].values.copy_(ht3_centered(d["vols"][k].double()).float() / 128)
            if not formed:
                eng.volume[1].values.zero_()
        for m in eng.memories:
            m.rotations.copy_(d["R"].float())
            m.shifts.copy_(d["t"].float())
        eng.classes = torch.from_numpy(d["truth"].copy())
        eng.models.opt_volume1.state[eng.volume[1].values] = {"step": torch.tensor(3.0)}
        a0, b0, r1 = eng.volume[0].grid().detach().clone(), eng.volume[1].grid().detach().clone(), d["R"].float()
        eng._reform_classes(epoch=1)
        rec = eng.history.to_json()["class_reforms"]
        assert [(r["class"], r["particles"], r["replaced"]) for r in rec] == [(1, 40, not formed)]
        assert (rec[0]["reformed_loss"] < rec[0]["loss"]) != formed
        assert torch.equal(eng.volume[0].grid(), a0) and eng.class_sizes() == [60, 40]
        assert torch.equal(eng.memories[1].rotations[:60], r1[:60])  # the other class's particles untouched
        if formed:
            assert torch.equal(eng.volume[1].grid(), b0) and torch.equal(eng.memories[1].rotations, r1)
        else:  # its particles' poses in it: the re-formed ones, its Adam state dropped
            assert eng.volume[1].grid().abs().sum() > 0 and eng.volume[1].values not in eng.models.opt_volume1.state
            assert not torch.equal(eng.memories[1].rotations[60:], r1[60:])


def test_k2_run_resumes_identically_and_records_classes(mixture):
    d = mixture
    ref = AbinitEngine(d["images"], torch.tensor(6.0), d["ctf"], _cfg(), "cpu")
    assert ref.run() == "done"
    assert ref.encoder.heads == 4 and len(ref.decoder_maps()) == 2
    h = ref.history.to_json()
    assert all(len(s) == 2 and sum(s) == 100 for s in h["class_sizes"])
    assert h["class_moves"][-1] is not None and h["class_moves"][0] is None
    c = ref.final_classes()
    assert c.shape == (100,) and set(np.unique(c)) <= {0, 1}

    for stop_at in (2, 5):  # mid stage-1 epoch 1 (the classes' scan sections are in the checkpoint), and later
        eng = AbinitEngine(d["images"], torch.tensor(6.0), d["ctf"], _cfg(), "cpu")
        calls = {"n": 0}

        def stop():
            calls["n"] += 1
            return calls["n"] >= stop_at

        assert eng.run(should_stop=stop) == "stopped"
        state = eng.state_dict()
        if stop_at == 2:
            assert state["stage"] == 1 and state["batch_pos"] > 0 and len(state["class_scans"]) == 2
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        eng2 = AbinitEngine(d["images"], torch.tensor(6.0), d["ctf"], _cfg(), "cpu")
        eng2.load_state_dict(torch.load(buf, weights_only=True))
        assert eng2.run() == "done"
        assert np.array_equal(eng2.final_classes(), c)
        assert np.array_equal(eng2.final_poses()[0], ref.final_poses()[0])
        assert all(torch.equal(a, b) for a, b in zip(eng2.decoder_maps(), ref.decoder_maps()))


def test_one_class_records_no_classes(mixture):
    d = mixture
    eng = AbinitEngine(d["images"], torch.tensor(6.0), d["ctf"], _cfg(classes=1), "cpu")
    eng.run()
    h = eng.history.to_json()
    assert all(s is None for s in h["class_sizes"]) and "class_reseeds" not in h
    assert "classes" not in eng.state_dict()
    assert np.array_equal(eng.final_classes(), np.zeros(100, int))


def test_abinit_classes_end_to_end_and_report_from_folder(tmp_path):
    """`cryospin abinit --classes 2` on a small simulated set: class folders, rlnClassNumber, history class
    sizes; `cryospin report DIR` rebuilds the class pages from the folder alone."""
    import json

    from cryospin_relion import cli
    from engine_synth import simulated_star

    from cryospin_relion.io.star import load_star_blocks, particle_block_name
    from cryospin_relion.lifecycle.live_report import report_from_folder

    star = simulated_star(tmp_path, 160, map_seed=1, sim_seed=2)
    out = tmp_path / "run"
    rc = cli.run(["abinit", "--i", str(star), "--o", str(out), "--classes", "2", "--epochs-amortized", "2",
                  "--min-epochs-amortized", "2", "--epochs-autodecode", "1", "--stage1-trials", "1",
                  "--explore-candidates", "256", "--batch-size", "32", "--quiet", "--json-summary",
                  str(tmp_path / "s.json")])
    assert rc == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [c["class"] for c in summary["classes"]] == [1, 2]
    assert sum(c["n_particles"] for c in summary["classes"]) == 160
    assert not (out / "map.mrc").exists()
    for c in summary["classes"]:
        if c["map"] is not None:
            assert (out / c["map"]).is_file() and (out / c["map"]).parent.joinpath("fsc.txt").is_file()
    blocks = load_star_blocks(out / "particles.star")
    cls = np.asarray(blocks[particle_block_name(blocks, out / "particles.star")]["rlnClassNumber"], dtype=int)
    assert set(np.unique(cls)) <= {1, 2} and len(cls) == 160
    hist = json.loads((out / "history.json").read_text())
    assert hist["class_sizes"][-1] == np.bincount(cls - 1, minlength=2).tolist()
    (out / "logfile.pdf").unlink()
    pages = report_from_folder(out)
    assert (out / "logfile.pdf").is_file() and "class_sizes" in " ".join(map(str, pages))

