"""The trained models of a run: the pose encoder, the Hartley volume and their Adam optimisers.

Stage 1 trains the encoder and the volume (``opt_encoder``, ``opt_volume1``); stage 2
the volume alone with its own optimiser and learning rate (``opt_volume2``), as the
reference does. With K classes (``classes``) the volume is a ``ClassVolumes`` of K volumes and the
encoder has K x M heads (class k's heads are k*M .. k*M+M-1; engine/classes.py). Models are built under
their own seed in a forked random state, so building them never changes the global random numbers of the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin_relion.config import AbinitConfig
from cryospin_relion.model.class_volumes import ClassVolumes
from cryospin_relion.model.encoder import PoseEncoder
from cryospin_relion.model.volume import HartleyVolume


@dataclass
class Models:
    """The encoder, the volume and their optimisers (stage 1 and stage 2 each have a volume optimiser)."""

    encoder: PoseEncoder
    volume: HartleyVolume | ClassVolumes
    opt_encoder: torch.optim.Optimizer
    opt_volume1: torch.optim.Optimizer
    opt_volume2: torch.optim.Optimizer

    @classmethod
    def build(cls, cfg: AbinitConfig, box: int, encoder_box: int, max_shift: float, radial: Tensor, seed: int,
              device: torch.device) -> "Models":
        """Fresh models, initialised from ``seed`` without touching the global random state."""
        m, o = cfg.model, cfg.optim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = PoseEncoder(encoder_box, m.heads * m.classes, max_shift, m.preset, m.octaves).to(device)
            volume = HartleyVolume(box, m.volume_param, m.mask_radius, radial).to(device)
            if m.classes > 1:
                volume = ClassVolumes([volume] + [HartleyVolume(box, m.volume_param, m.mask_radius, radial).to(device)
                                                  for _ in range(m.classes - 1)])
        return cls(encoder, volume, torch.optim.Adam(encoder.parameters(), lr=o.lr_encoder),
                   torch.optim.Adam(volume.parameters(), lr=o.lr_decoder),
                   torch.optim.Adam(volume.parameters(), lr=o.lr_decoder_stage2))

    def state_dict(self) -> dict:
        return {"encoder": {k: v.cpu() for k, v in self.encoder.state_dict().items()},
                "volume": {k: v.cpu() for k, v in self.volume.state_dict().items()},
                **{k: _optimizer_to_cpu(getattr(self, k).state_dict()) for k in ("opt_encoder", "opt_volume1",
                                                                                 "opt_volume2")}}

    def load_state_dict(self, d: dict) -> None:
        self.encoder.load_state_dict(d["encoder"])
        self.volume.load_state_dict(d["volume"])
        for k in ("opt_encoder", "opt_volume1", "opt_volume2"):
            getattr(self, k).load_state_dict(d[k])


def _optimizer_to_cpu(sd: dict) -> dict:
    return {"state": {k: {kk: (vv.cpu() if isinstance(vv, Tensor) else vv) for kk, vv in v.items()}
                      for k, v in sd["state"].items()},
            "param_groups": sd["param_groups"]}
