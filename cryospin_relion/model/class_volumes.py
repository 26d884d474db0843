"""K class volumes (``abinit --classes K``): one ``HartleyVolume`` per class, sliced by each image's class.

Each class is an independent decoder with its own arbitrary orientation and hand:
a particle's pose is a pose in its own class's frame, so a batch's slices are
taken from the grid of each image's class (``slices(..., cls=)``). The pose
search and the per-class passes use one class at a time (``self[k]``, a plain
``HartleyVolume``), so everything written for one volume works unchanged.

Why K modules and not one (K, n, n, n) parameter: a class that no image of a
batch belongs to gets no gradient, and Adam leaves it where it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cryospin_relion.model.volume import HartleyVolume


class ClassVolumes(nn.Module):
    """K ``HartleyVolume`` of one box; ``grid()`` is (K, n, n, n), ``slices`` takes each image's class."""

    def __init__(self, volumes: list[HartleyVolume]):
        super().__init__()
        if len(volumes) < 2 or len({v.box for v in volumes}) != 1:
            raise ValueError("ClassVolumes needs at least 2 volumes of one box")
        self.classes = nn.ModuleList(volumes)
        self.box = volumes[0].box

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, k: int) -> HartleyVolume:
        return self.classes[k]

    def grid(self) -> Tensor:
        """(K, n, n, n) Hartley coefficients of every class (differentiable)."""
        return torch.stack([v.grid() for v in self.classes])

    def slices(self, rotations: Tensor, crop: int | None = None, grid: Tensor | None = None,
               cls: Tensor | None = None, freqs: Tensor | None = None) -> Tensor:
        """Hartley central sections (B, c, c) at poses (B, 3, 3), each from the grid of its class ``cls`` (B,)
        (0-based; required). ``grid``: (K, n, n, n) from ``grid()`` (e.g. detached), default the live one.
        ``freqs``: as ``HartleyVolume.slices`` ((B, P))."""
        if cls is None:
            raise ValueError("ClassVolumes.slices needs each image's class")
        c = self.box if crop is None else crop
        order = torch.argsort(cls, stable=True)
        counts = torch.bincount(cls, minlength=len(self.classes)).tolist()
        parts, a = [], 0
        for k, n in enumerate(counts):
            if n:
                rows = order[a:a + n]
                # without ``grid``, only the classes present build theirs
                parts.append(self.classes[k].slices(rotations[rows], crop=c, grid=None if grid is None else grid[k],
                                                    freqs=freqs))
                a += n
        if not parts:
            return rotations.new_zeros(0, c, c) if freqs is None else rotations.new_zeros(0, len(freqs))
        sl = torch.cat(parts, 0)
        return sl[torch.argsort(order)]  # back to the batch's order (differentiable gather)

    @torch.no_grad()
    def real_maps(self) -> list[Tensor]:
        """The K real-space maps (n, n, n) float32 (``HartleyVolume.real_map``)."""
        return [v.real_map() for v in self.classes]

    @torch.no_grad()
    def split(self, src: int, dst: int, factor: float = 0.5) -> None:
        """Re-seed class ``dst`` as ``factor`` x class ``src``'s grid (the classical split of the largest
        cluster). Why scaled and not perturbed at random: against the weaker copy an image has the lower loss
        exactly when it fits ``src`` poorly (L2: when its correlation with the model is under (1 + factor) / 2
        of the model's power), so the split sends ``src``'s worst-fitting images, junk first, to ``dst``
        instead of a random half."""
        s, d = self.classes[src], self.classes[dst]
        if s.param == "linear":
            d.values.copy_(s.values * factor)
        else:
            d.mantissa.copy_(s.mantissa * factor)
            d.exponent.copy_(s.exponent)

    @torch.no_grad()
    def clear(self, k: int) -> None:
        """Empty class ``k``: a zero grid, whose model image is zero, so the images it fits best are those that
        no other class explains (junk); it learns again from the images that join it."""
        v = self.classes[k]
        (v.values if v.param == "linear" else v.mantissa).zero_()
