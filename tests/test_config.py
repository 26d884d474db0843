"""The sectioned config: flat YAML keys, exact types, flags and the resumable set derived from metadata."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from cryospin_relion.commands import abinit as abinit_cmd
from cryospin_relion.config import RESUMABLE, SECTIONS, AbinitConfig, options
from cryospin_relion.errors import InputError


def test_flat_yaml_keys_round_trip_through_sections(tmp_path):
    cfg = AbinitConfig.from_dict({"heads": 7, "explore_top": 5, "seed": 3, "pose_betas": [0.8, 0.95], "box": None})
    assert (cfg.model.heads, cfg.search.explore_top, cfg.run.seed, cfg.optim.pose_betas) == (7, 5, 3, [0.8, 0.95])
    p = tmp_path / "c.yaml"
    cfg.to_yaml(p)
    text = p.read_text()
    assert "heads: 7" in text and "model" not in text  # flat keys, as users' files have them
    assert AbinitConfig.from_yaml(p) == cfg
    assert list(cfg.to_dict()) == [o.name for o in options()]
    assert len(cfg.to_dict()) == sum(len(c.__dataclass_fields__) for c in SECTIONS.values())


@pytest.mark.parametrize("yaml_text, option", [
    ("invert: [false]\n", "invert"),  # a list is not a boolean
    ("invert: 1\n", "invert"),
    ("invert: 'yes'\n", "invert"),
    ("heads: 3.0\n", "heads"),  # a float is not an integer
    ("heads: true\n", "heads"),  # nor is a boolean
    ("max_shift: .nan\n", "max_shift"),
    ("lr_pose: .inf\n", "lr_pose"),
    ("loss: l3\n", "loss"),
    ("device: 1\n", "device"),
    ("pose_betas: [0.9, true]\n", "pose_betas"),
    ("box: null\nbatch_size: null\n", "batch_size"),  # only Optional options take null
])
def test_exact_types_are_required(tmp_path, yaml_text, option):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(InputError, match=f"{p}: {option}: ") as e:
        AbinitConfig.from_yaml(p)
    assert "\n" not in str(e.value)


def test_an_integer_is_a_valid_float_and_values_are_checked():
    assert AbinitConfig.from_dict({"lr_pose": 1}).optim.lr_pose == 1.0
    assert isinstance(AbinitConfig.from_dict({"lr_pose": 1}).optim.lr_pose, float)
    with pytest.raises(InputError, match="^--explore-top: -1 must be >= 0$"):  # the flag, as typed
        AbinitConfig().override(explore_top=-1)
    with pytest.raises(InputError, match="^c.yaml: explore_top: -1 must be >= 0$"):  # a file: the option
        AbinitConfig.from_dict({"explore_top": -1}, "c.yaml")
    with pytest.raises(InputError, match="^--max-shift: nan is not a finite number$"):
        AbinitConfig().override(max_shift=math.nan)


def test_the_config_is_frozen_and_with_box_makes_a_copy():
    cfg = AbinitConfig()
    with pytest.raises(Exception):
        cfg.data.box = 32  # type: ignore[misc]
    cfg32 = cfg.with_box(32)
    assert cfg.data.box is None and cfg32.data.box == 32 and cfg32.model == cfg.model


def test_flags_and_resumable_set_come_from_the_fields():
    p = argparse.ArgumentParser()
    abinit_cmd.add_args(p)
    dests = {a.dest for a in p._actions}
    for o in options():
        if o.flag is not None or o.meta["off_flag"] is not None:
            assert o.name in dests, o.name
    a = p.parse_args(["--i", "x", "--o", "y", "--switch-threshold", "2", "--j", "3", "--no-auto-switch", "--invert"])
    assert (a.switch_threshold_deg, a.threads, a.auto_switch, a.invert) == (2.0, 3, False, True)
    a = p.parse_args(["--i", "x", "--o", "y"])
    assert a.auto_switch is None and a.invert is None  # an absent flag leaves YAML / defaults alone
    assert RESUMABLE == {"epochs_amortized", "epochs_autodecode", "device", "threads", "flip_hand",
                         "checkpoint_minutes", "mw_kda", "sym"}
    assert AbinitConfig().with_box(32).resume_changes(AbinitConfig().override(epochs_autodecode=9).to_dict()) == \
        ["box"]


def test_building_the_engine_leaves_the_global_random_state_alone():
    from cryospin_relion.engine.run import AbinitEngine
    from cryospin_relion.evaluate.blobs import simulate_blobs

    d = simulate_blobs(n=16, N=24, apix=6.0, snr=2.0, max_shift_px=1.0, seed=1)
    torch.manual_seed(11)
    expect = torch.rand(3)
    torch.manual_seed(11)
    AbinitEngine(d["images"], d["apix"], d["ctf"], AbinitConfig.from_dict({"heads": 2, "stage1_trials": 1}), "cpu")
    assert torch.equal(torch.rand(3), expect)
