"""The forward model: image formation in Hartley space, and the reconstruction losses.

For a particle with pose A, content translation t (pixels at the working box n),
CTF c and image y (real, (n, n)), the model compares, inside a radial mask,

    model(k)  = shift_t( c(k) * slice_A(V)(k) )            (Hartley, centred layout)
    target(k) = HT2(y)(k) / n

on the central crop x crop frequencies (coarse-to-fine; crop = n at full size).
Here c(k) is the factor the images carry (``geometry.ctf.projection_factor``):
the CTF, its square for CTF-premultiplied images, its modulus for phase-flipped ones.
The Hartley shift is ``geometry.shifts.hartley_shift`` with the translation
rescaled to the crop's pixel units (t * crop / n), which gives exactly the phase
exp(-2 pi i k.t / n) of the full box.

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
from cryospin_relion.geometry.shifts import hartley_shift


@dataclass
class Batch:
    """One batch prepared for the loss: everything on the compute device."""

    idx: Tensor  # (B,) particle indices
    images: Tensor  # (B, n, n) real images (encoder input)
    target: Tensor  # (B, c, c) cropped Hartley transform / n
    ctf: Tensor | None  # (B, c, c) CTF on the cropped grid, or None
    mask_index: Tensor  # (P,) long: the flat indices (into c * c) of the P frequencies inside the mask
    box: int  # n
    crop: int  # c
    cls: Tensor | None = None  # (B,) each image's class (0-based), for K class volumes; None with one volume
    mask_radius: float = 1.0  # the mask's radius, fraction of the working-box Nyquist (``crop_mask``)


def crop_mask(box: int, crop: int, mask_radius: float = 1.0, device=None) -> Tensor:
    """(crop, crop) bool: radius < crop / 2 and <= mask_radius * box / 2 (Fourier pixels of the full box).

    The strict ``< crop / 2`` leaves out the unpaired edge row/column of an even crop."""
    r = radius_grid_2d(crop, device=device)  # radius in pixels of the crop grid == full-box Fourier pixels
    return (r < crop / 2) & (r <= mask_radius * box / 2)


@functools.lru_cache(maxsize=64)
def mask_index(box: int, crop: int, mask_radius: float = 1.0, device: str = "cpu") -> Tensor:
    """(P,) long: the flat indices (into crop * crop, ascending) of ``crop_mask``, on ``device``.

    Why indices and not the boolean mask: ``x[..., mask]`` has a size that depends on the mask's values, so
    on CUDA every such indexing (and its backward) waits for the GPU to tell the host that size. The indices
    are made once per (box, crop, radius, device) and reused by every batch."""
    return crop_mask(box, crop, mask_radius).reshape(-1).nonzero()[:, 0].to(device)


def masked(x: Tensor, index: Tensor) -> Tensor:
    """(..., c, c) -> (..., P): the coefficients at the flat indices ``index`` (``Batch.mask_index``)."""
    return x.flatten(-2).index_select(-1, index)


def ctf_cropped(box: int, crop: int, apix: Tensor, ctf: CTF) -> Tensor:
    """The CTF factor (B, crop, crop) of the projection in the images (``ctf.projection_factor``: c, c^2 for
    CTF-premultiplied images, |c| for phase-flipped ones) at the central crop frequencies of a box-``box``
    image of pixel size apix."""
    return projection_factor(ctf_2d(crop, apix * (box / crop), ctf), ctf)


def prepare_batch(idx: Tensor, images: Tensor, apix: Tensor, ctf_params: CTF | None,
                  crop: int, mask_radius: float = 1.0) -> Batch:
    """Targets, CTF and mask for real images (B, n, n) on their device.

    Args:
        apix: (B,) pixel size at the working box.
        ctf_params: the images' CTF parameters, or None (no CTF).
    """
    n = images.shape[-1]
    target = crop_centered_2d(ht2_centered(images), crop) / n
    ctf = None if ctf_params is None else ctf_cropped(n, crop, apix, ctf_params).to(images.dtype)
    return Batch(idx, images, target.contiguous(), ctf, mask_index(n, crop, mask_radius, str(images.device)), n, crop,
                 mask_radius=mask_radius)


def recrop(batch: Batch, crop: int) -> Batch:
    """The same batch at a smaller central Fourier box ``crop`` (even, <= batch.crop): target, CTF and mask
    are the central crops of the batch's; the mask is ``crop_mask`` at ``crop`` (the batch's, cropped, with
    radius < crop / 2)."""
    if crop >= batch.crop:
        return batch
    ctf = None if batch.ctf is None else crop_centered_2d(batch.ctf, crop).contiguous()
    return Batch(batch.idx, batch.images, crop_centered_2d(batch.target, crop).contiguous(), ctf,
                 mask_index(batch.box, crop, batch.mask_radius, str(batch.target.device)), batch.box, crop,
                 batch.cls, batch.mask_radius)


def render(slices: Tensor, ctf: Tensor | None, shifts_px: Tensor, box: int) -> Tensor:
    """Model Hartley images from slices (K, c, c), CTF (K, c, c) or None, shifts (K, 2) at the full box."""
    c = slices.shape[-1]
    x = slices if ctf is None else slices * ctf
    return hartley_shift(x, shifts_px * (c / box))


def per_image_loss(model: Tensor, target: Tensor, mask_index: Tensor, kind: str = "l1") -> Tensor:
    """(..., c, c) model vs target (broadcast) -> (...) mean loss over the mask (its flat indices
    ``Batch.mask_index``)."""
    d = masked(model - target, mask_index)
    if kind == "l1":
        return d.abs().mean(-1)
    if kind == "l2":
        return (d * d).mean(-1)
    raise ValueError(f"unknown loss {kind!r}")
