"""The multi-head pose encoder of the auto-encoding stage.

Input: a particle image (B, n, n) plus a Gaussian pyramid of blurred copies
(sigma = 1, 2, 4, ... pixels, ``octaves`` of them; 4 in the reference) stacked as
channels. A VGG-style CNN (3x3 conv + batch norm + ReLU, then 2x2 max-pool, one
block per entry of ``channels``) feeds M heads; each head is an MLP giving a
rotation in the 6D representation (``geometry.rotations.sixd_to_matrix``: rows of
RELION's A) and an in-plane translation bounded by ``max_shift * tanh``.

Presets:
  - ``paper``: channels 64-128-256-256-256, two convolutions per block, head MLPs
    of width 256 (the reference's encoder size).
  - ``fast``: channels 16-32-64-64, one convolution per block, head width 128
    (sized for CPUs; see bench/abinit.py for the measured difference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cryospin_relion.geometry.rotations import sixd_to_matrix
from cryospin_relion.model.global_norm import GlobalBatchNorm2d

ENCODER_PRESETS = {
    "fast": dict(channels=(16, 32, 64, 64), convs_per_block=1, hidden=128),
    "paper": dict(channels=(64, 128, 256, 256, 256), convs_per_block=2, hidden=256),
}


def gaussian_kernel_1d(sigma: float, max_size: int) -> Tensor:
    half = max(1, min(int(math.ceil(3 * sigma)), (max_size - 1) // 2))
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class GaussianPyramid(nn.Module):
    """(B, n, n) -> (B, 1 + octaves, n, n): the image and blurred copies at sigma 2^k, k = 0 .. octaves-1."""

    def __init__(self, box: int, octaves: int = 4):
        super().__init__()
        self.octaves = octaves
        self.kernels = [gaussian_kernel_1d(2.0**k, box) for k in range(octaves)]
        for i, k in enumerate(self.kernels):
            self.register_buffer(f"k{i}", k)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, None]
        out = [x]
        for i in range(self.octaves):
            k = getattr(self, f"k{i}")
            p = (len(k) - 1) // 2
            y = F.conv2d(F.pad(x, (p, p, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
            y = F.conv2d(F.pad(y, (0, 0, p, p), mode="reflect"), k.view(1, 1, -1, 1))
            out.append(y)
        return torch.cat(out, 1)


class PoseEncoder(nn.Module):
    """Image -> M candidate poses (rotations (B, M, 3, 3), shifts (B, M, 2) in working-box pixels)."""

    def __init__(self, box: int, heads: int, max_shift: float, preset: str = "fast", octaves: int = 4):
        super().__init__()
        spec = ENCODER_PRESETS[preset]
        self.box, self.heads, self.max_shift = box, heads, float(max_shift)
        self.pyramid = GaussianPyramid(box, octaves)
        layers: list[nn.Module] = []
        cin = 1 + octaves
        size = box
        for cout in spec["channels"]:
            for _ in range(spec["convs_per_block"]):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), GlobalBatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        layers.append(nn.AdaptiveAvgPool2d(2))
        self.cnn = nn.Sequential(*layers)
        feat = cin * 4
        h = spec["hidden"]
        self.heads_mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(feat, h), nn.ReLU(inplace=True), nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, 8))
            for _ in range(heads)
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.cnn(self.pyramid(images)).flatten(1)
        out = torch.stack([m(f) for m in self.heads_mlp], 1)  # (B, M, 8)
        rot = sixd_to_matrix(out[..., :6])
        shift = self.max_shift * torch.tanh(out[..., 6:])
        return rot, shift
