"""`cryospin abinit`: config precedence, dry run, bad input, outputs, SIGTERM + --continue."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cryospin_relion import cli
from cryospin_relion.config import AbinitConfig
from cryospin_relion.errors import InputError

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import simulated_star  # noqa: E402


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    return simulated_star(tmp_path_factory.mktemp("sim"), n=160, map_seed=1, sim_seed=2)


def test_config_yaml_roundtrip_and_errors(tmp_path):
    cfg = AbinitConfig.from_dict({"heads": 3, "loss": "l2", "pose_betas": [0.8, 0.9]})
    p = tmp_path / "c.yaml"
    cfg.to_yaml(p)
    assert AbinitConfig.from_yaml(p) == cfg
    p.write_text("heads: 0\n")
    with pytest.raises(InputError, match="heads"):
        AbinitConfig.from_yaml(p)
    p.write_text("no_such_option: 1\n")
    with pytest.raises(InputError, match="no_such_option"):
        AbinitConfig.from_yaml(p)
    with pytest.raises(InputError, match="box"):
        AbinitConfig().override(box=33)


def test_precedence_flags_over_yaml_over_defaults(tmp_path, star):
    y = tmp_path / "c.yaml"
    y.write_text("heads: 3\nbatch_size: 40\nloss: l2\n")
    out = tmp_path / "run"
    rc = cli.run(["abinit", "--i", str(star), "--o", str(out), "--config", str(y), "--heads", "5", "--dry-run",
                  "--quiet"])
    assert rc == 0
    eff = AbinitConfig.from_yaml(out / "config.yaml")
    assert (eff.model.heads, eff.schedule.batch_size, eff.model.loss) == (5, 40, "l2")
    assert eff.schedule.epochs_autodecode == AbinitConfig().schedule.epochs_autodecode
    assert eff.data.box == 16
    assert "effective config" in (out / "run.log").read_text()


def test_schedule_and_search_flags_reach_the_config(tmp_path, star):
    out = tmp_path / "run"
    rc = cli.run(["abinit", "--i", str(star), "--o", str(out), "--dry-run", "--quiet",
                  "--explore-candidates", "0", "--explore-top", "3", "--explore-rounds", "2", "--explore-local", "5",
                  "--explore-local-deg", "7.5", "--explore-shift", "0.5", "--distill-weight", "0.25",
                  "--lr-decoder-decay", "0.9", "--min-epochs-amortized", "4", "--switch-threshold", "2",
                  "--no-auto-switch", "--no-coarse-to-fine", "--stage1-particles", "500", "--stage1-trials", "2",
                  "--stage1-trial-epochs", "1", "--stage1-max-crop", "24", "--explore-grid-crop", "12",
                  "--explore-shift-range", "0.1", "--explore-shift-step", "2"])
    assert rc == 0
    eff = AbinitConfig.from_yaml(out / "config.yaml")
    se, sc = eff.search, eff.schedule
    assert (se.explore_candidates, se.explore_top, se.explore_rounds, se.explore_local) == (0, 3, 2, 5)
    assert (se.explore_local_deg, se.explore_shift_px, se.distill_weight, eff.optim.lr_decoder_decay) == \
        (7.5, 0.5, 0.25, 0.9)
    assert (sc.min_epochs_amortized, sc.switch_threshold_deg) == (4, 2.0)
    assert sc.auto_switch is False and sc.coarse_to_fine is False
    assert (sc.stage1_particles, sc.stage1_trials, sc.stage1_trial_epochs, sc.stage1_max_crop) == (500, 2, 1, 24)
    assert (se.explore_grid_crop, se.explore_shift_range, se.explore_shift_step) == (12, 0.1, 2.0)
    # a bad value names the flag's field
    assert cli.run(["abinit", "--i", str(star), "--o", str(tmp_path / "r2"), "--dry-run", "--quiet",
                    "--explore-top", "-1"]) == 2


def test_bad_input_exit_2(tmp_path, star, capsys):
    assert cli.run(["abinit", "--i", str(tmp_path / "none.star"), "--o", str(tmp_path / "o")]) == 2
    assert cli.run(["abinit", "--i", str(star), "--o", str(tmp_path / "o2"), "--box", "15", "--dry-run"]) == 2
    assert cli.run(["abinit", "--i", str(star), "--o", str(tmp_path / "o3"), "--continue", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err


def test_run_outputs_and_sigterm_continue(tmp_path, star):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "cryospin_relion.cli", "abinit", "--i", str(star), "--o", str(out), "--quiet",
            "--heads", "2", "--epochs-amortized", "2", "--epochs-autodecode", "30", "--batch-size", "16", "--j", "1",
            "--json-summary", str(out / "summary.json")]
    proc = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (out / "checkpoint.pt").exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    assert rc == 143, proc.communicate()
    h = json.loads((out / "history.json").read_text())
    assert len(h["epoch"]) < 32
    # resume with fewer stage-2 epochs so the test stays short
    rc = cli.run(["abinit", "--i", str(star), "--o", str(out), "--continue", "--quiet", "--epochs-autodecode", "1",
                  "--json-summary", str(out / "summary.json")])
    assert rc == 0
    for name in ("half1_map.mrc", "half2_map.mrc", "map.mrc", "decoder_map.mrc", "fsc.txt", "particles.star",
                 "config.yaml", "run.log", "history.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["n_particles"] == 160 and s["box"] == 16
    from cryospin_relion.io.mrc import read_mrc
    from cryospin_relion.io.read import read_particles

    m, vs = read_mrc(out / "map.mrc")
    assert m.shape == (16, 16, 16) and vs == pytest.approx(6.0)
    t = read_particles(out / "particles.star", check_stacks=False)
    assert len(t) == 160 and set(np.unique(t.subset)) == {1, 2}
    assert "resuming at epoch" in (out / "run.log").read_text()


def test_true_poses_give_pose_error_per_epoch(tmp_path, star):
    out = tmp_path / "run"
    rc = cli.run(["abinit", "--i", str(star), "--o", str(out), "--quiet", "--heads", "2", "--epochs-amortized", "2",
                  "--epochs-autodecode", "1", "--batch-size", "32", "--true-poses", str(star)])
    assert rc == 0
    h = json.loads((out / "history.json").read_text())
    pe = h["pose_error"]
    assert pe["epoch"] == h["epoch"] and all(0 <= x <= 180 for x in pe["median_deg"])
    assert (out / "pose_error.png").is_file()
