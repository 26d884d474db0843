"""The particles as the engine sees them: working-box images on the host, pixel sizes and CTFs on the device.

Images stay where the caller keeps them (a numpy memory map of the cached
working stack, or a tensor); a batch is read in sorted row order (sequential on
disk) and moved to the device. ``batch`` prepares the forward model's inputs
(engine/forward.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryospin_relion.engine.forward import Batch, ctf_cropped, prepare_batch
from cryospin_relion.geometry.ctf import CTF
from cryospin_relion.geometry.fourier import fourier_crop_2d, ht2_centered
from cryospin_relion.model.volume import radial_profile_2d


class ParticleImages:
    """Images (N, n, n) (host), pixel sizes (N,) and CTFs (or None) on ``device``."""

    def __init__(self, images, apix_work, ctf: CTF | None, device: torch.device):
        self.images = images
        self.N, self.box = int(images.shape[0]), int(images.shape[-1])
        if self.box % 2:
            raise ValueError("the working box must be even")
        self.device = torch.device(device)
        ap = torch.as_tensor(apix_work, dtype=torch.float32)
        self.apix = (ap.expand(self.N) if ap.ndim == 0 else ap).to(self.device).contiguous()
        self.ctf = None if ctf is None else ctf.to(self.device, torch.float32)

    def __len__(self) -> int:
        return self.N

    def load(self, idx: Tensor) -> Tensor:
        """Images (B, n, n) float32 on the device, in the order of ``idx`` (a CPU index tensor)."""
        ii = idx.numpy()
        if isinstance(self.images, Tensor):
            x = self.images[idx]
        else:
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(self.images[np.sort(ii)]), dtype=np.float32))
            x = x[torch.from_numpy(np.argsort(np.argsort(ii)))]  # back to idx order
        return x.to(device=self.device, dtype=torch.float32)

    def batch(self, idx: Tensor, crop: int, mask_radius: float, encoder_box: int | None = None) -> Batch:
        """The forward model's batch at Fourier box ``crop``; ``encoder_box``: the encoder's input images are
        Fourier-cropped to it (None = the working box)."""
        idx = idx.to(self.device)
        ctf = None if self.ctf is None else self.ctf[idx]
        b = prepare_batch(idx, self.load(idx.cpu()), self.apix[idx], ctf, crop, mask_radius)
        if encoder_box is not None and encoder_box < self.box:
            b.images = fourier_crop_2d(b.images, encoder_box)
        return b

    def radial_scale(self, max_images: int = 512) -> Tensor:
        """Preconditioner per shell over up to ``max_images`` evenly spaced images: the RMS of the images'
        Hartley coefficients divided by the RMS of their CTF factor (``forward.ctf_cropped``: c, c^2 for
        premultiplied images, |c| phase-flipped; clamped at 0.1), i.e. the typical
        magnitude of the volume's coefficients (low frequencies, damped by the CTF, are large)."""
        k = min(self.N, max_images)
        idx = torch.from_numpy(np.unique(np.linspace(0, self.N - 1, k).round().astype(np.int64)))
        prof = radial_profile_2d(ht2_centered(self.load(idx)) / self.box).cpu()
        if self.ctf is not None:
            di = idx.to(self.device)
            c = ctf_cropped(self.box, self.box, self.apix[di], self.ctf[di])
            prof = prof / radial_profile_2d(c).cpu().clamp_min(0.1)
        return prof
