"""The forward model: image formation in Hartley space, and the reconstruction losses.

For a particle with pose A, content translation t (pixels at the working box n),
CTF c and image y (real, (n, n)), the model compares, inside a radial mask,

    model(k)  = shift_t( c(k) * slice_A(V)(k) )            (Hartley, centred layout)
    target(k) = HT2(y)(k) / n

on the central crop x crop frequencies (coarse-to-fine; crop = n at full size).
Here c(k) is the factor the images carry (``geometry.ctf.projection_factor``):
the CTF, its square for CTF-premultiplied images, its modulus for phase-flipped ones.
The Hartley shift is ``geometry.shifts.hartley_shift_at``: the phase
exp(-2 pi i k.t / n) of the full box at each frequency k of the crop.
Everything is computed at the frequencies inside the mask only (``FrequencyMask``):
slices, CTF, shift and loss are per frequency, so the corners of the crop that the
loss leaves out are never computed.

Losses, per image, averaged over the masked coefficients:
  - ``l1``: mean |model - target| (the reference)
  - ``l2``: mean (model - target)^2 (Gaussian noise model)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin_relion.geometry.ctf import CTF, ctf_2d, projection_factor
from cryospin_relion.geometry.fourier import crop_centered_2d, ht2_centered, radius_grid_2d
from cryospin_relion.geometry.shifts import hartley_shift_at, negated_index
from cryospin_relion.geometry.slicing import centred_frequencies


@dataclass(frozen=True, eq=False)  # one object per (box, crop, radius, device): compared by identity
class FrequencyMask:
    """The P frequencies a batch's loss uses: inside the radial mask (``crop_mask``) of the central crop x crop
    Fourier box of a box-n image, in the order of their flat index (fft2_centered layout).

    Why: the engine computes slices, CTFs, shifts and losses at these frequencies only, never at the corners
    of the square that the loss leaves out (22% of it); and indices, not a boolean mask: ``x[..., mask]`` has
    a size that depends on the mask's values, so on CUDA every such indexing waits for the GPU to tell the
    host that size. Made once per (box, crop, radius, device) by ``frequency_mask``."""

    index: Tensor  # (P,) long: flat indices into crop * crop, ascending
    freqs: Tensor  # (P, 2) float32 (fx, fy): cycles per working-box pixel
    negated: Tensor  # (P,) long: the position of -k among the P, for each k (the mask holds -k with k)
    box: int  # n
    crop: int  # c
    radius: float  # mask_radius: fraction of the working-box Nyquist


@dataclass
class Batch:
    """One batch prepared for the loss: everything on the compute device, the Fourier quantities at the
    frequencies of ``mask`` only."""

    idx: Tensor  # (B,) particle indices
    images: Tensor  # (B, n, n) real images (encoder input)
    target: Tensor  # (B, P) Hartley transform / n at the mask's frequencies
    ctf: Tensor | None  # (B, P) the CTF factor there, or None
    mask: FrequencyMask
    cls: Tensor | None = None  # (B,) each image's class (0-based), for K class volumes; None with one volume

    @property
    def box(self) -> int:
        return self.mask.box

    @property
    def crop(self) -> int:
        return self.mask.crop


def crop_mask(box: int, crop: int, mask_radius: float = 1.0, device=None) -> Tensor:
    """(crop, crop) bool: radius < crop / 2 and <= mask_radius * box / 2 (Fourier pixels of the full box).

    The strict ``< crop / 2`` leaves out the unpaired edge row/column of an even crop, so the mask holds -k
    with every k."""
    r = radius_grid_2d(crop, device=device)  # radius in pixels of the crop grid == full-box Fourier pixels
    return (r < crop / 2) & (r <= mask_radius * box / 2)


@functools.lru_cache(maxsize=64)
def frequency_mask(box: int, crop: int, mask_radius: float = 1.0, device: str = "cpu") -> FrequencyMask:
    """``FrequencyMask`` of ``crop_mask(box, crop, mask_radius)``, its tensors on ``device``."""
    index = crop_mask(box, crop, mask_radius).reshape(-1).nonzero()[:, 0]
    position = torch.full((crop * crop,), -1, dtype=torch.long)
    position[index] = torch.arange(len(index))
    negated = position[negated_index(crop)[index]]
    if bool((negated < 0).any()):
        raise ValueError(f"the mask of crop {crop} does not hold -k with k")
    freqs = centred_frequencies(crop, box)[index]
    return FrequencyMask(index.to(device), freqs.to(device), negated.to(device), box, crop, mask_radius)


@functools.lru_cache(maxsize=64)
def _positions_in(big: FrequencyMask, crop: int) -> tuple[FrequencyMask, Tensor]:
    """The mask at the smaller ``crop`` and the positions of its frequencies among ``big``'s (all are there)."""
    small = frequency_mask(big.box, crop, big.radius, str(big.index.device))
    c, C = crop, big.crop
    y, x = small.index.cpu() // c, small.index.cpu() % c
    flat = (y + (C // 2 - c // 2)) * C + (x + (C // 2 - c // 2))  # the same frequency on the big grid
    position = torch.full((C * C,), -1, dtype=torch.long)
    position[big.index.cpu()] = torch.arange(len(big.index))
    return small, position[flat].to(big.index.device)


def ctf_cropped(box: int, crop: int, apix: Tensor, ctf: CTF) -> Tensor:
    """The CTF factor (B, crop, crop) of the projection in the images (``ctf.projection_factor``: c, c^2 for
    CTF-premultiplied images, |c| for phase-flipped ones) at the central crop frequencies of a box-``box``
    image of pixel size apix."""
    return projection_factor(ctf_2d(crop, apix * (box / crop), ctf), ctf)


def masked(x: Tensor, mask: FrequencyMask) -> Tensor:
    """(..., c, c) -> (..., P): the coefficients at the mask's frequencies."""
    return x.flatten(-2).index_select(-1, mask.index)


def prepare_batch(idx: Tensor, images: Tensor, apix: Tensor, ctf_params: CTF | None,
                  crop: int, mask_radius: float = 1.0) -> Batch:
    """Targets, CTF and mask for real images (B, n, n) on their device.

    Args:
        apix: (B,) pixel size at the working box.
        ctf_params: the images' CTF parameters, or None (no CTF).
    """
    n = images.shape[-1]
    mask = frequency_mask(n, crop, mask_radius, str(images.device))
    target = masked(crop_centered_2d(ht2_centered(images), crop), mask) / n
    ctf = None if ctf_params is None else masked(ctf_cropped(n, crop, apix, ctf_params).to(images.dtype), mask)
    return Batch(idx, images, target, ctf, mask)


def recrop(batch: Batch, crop: int) -> Batch:
    """The same batch at a smaller central Fourier box ``crop`` (even, <= batch.crop): target and CTF at the
    frequencies of the smaller mask (``crop_mask`` at ``crop``: the batch's, cropped, with radius < crop / 2)."""
    if crop >= batch.crop:
        return batch
    small, pos = _positions_in(batch.mask, crop)
    ctf = None if batch.ctf is None else batch.ctf.index_select(-1, pos)
    return Batch(batch.idx, batch.images, batch.target.index_select(-1, pos), ctf, small, batch.cls)


def render(slices: Tensor, ctf: Tensor | None, shifts_px: Tensor, mask: FrequencyMask) -> Tensor:
    """Model Hartley coefficients (K, P) at the mask's frequencies from slices (K, P), CTF (K, P) or None and
    content translations (K, 2) in working-box pixels."""
    x = slices if ctf is None else slices * ctf
    return hartley_shift_at(x, shifts_px, mask.freqs, mask.negated)


def per_image_loss(model: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    """(..., P) model vs target (broadcast) -> (...) mean loss over the P frequencies."""
    d = model - target
    if kind == "l1":
        return d.abs().mean(-1)
    if kind == "l2":
        return (d * d).mean(-1)
    raise ValueError(f"unknown loss {kind!r}")
