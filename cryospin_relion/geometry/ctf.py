"""The contrast transfer function, RELION's formula (src/ctf.h, CTF::getCTF).

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))          [A], V in volts
    df(theta) = -( (dU + dV)/2 + (dU - dV)/2 cos(2 (theta - angle)) )   underfocus < 0
    chi = pi lambda df s^2 + pi/2 Cs lambda^3 s^4 - phase_shift - atan(Q0 / sqrt(1 - Q0^2))
    CTF = -scale * sin(chi) * exp(-B s^2 / 4)

with s the spatial frequency in 1/A, theta its angle from the x axis, defocus
U/V in A, angle and phase shift in degrees, Cs in mm, voltage in kV, amplitude
contrast Q0 as a fraction, B in A^2. At s = 0 the CTF is sin(atan(...)) = Q0 > 0:
protein-positive images stay positive at low frequency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin_relion.geometry.fourier import freq_grid_2d


def electron_wavelength(voltage_kv: Tensor) -> Tensor:
    """Relativistic electron wavelength in A for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf_from_freqs(
    fx: Tensor,
    fy: Tensor,
    defocus_u: Tensor,
    defocus_v: Tensor,
    defocus_angle: Tensor,
    voltage: Tensor,
    cs: Tensor,
    amp_contrast: Tensor,
    phase_shift: Tensor | None = None,
    bfactor: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """CTF values at frequencies (fx, fy) in 1/A.

    Args:
        fx, fy: (..., H, W) frequencies in 1/A (broadcast against the parameters).
        defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
        phase_shift, bfactor, scale: (B,) per-image parameters (units above).
    Returns:
        (B, H, W) real CTF.
    """
    p = lambda t: t[:, None, None]  # noqa: E731  (B,) -> (B,1,1)
    lam = electron_wavelength(voltage)
    s2 = fx**2 + fy**2
    theta = torch.atan2(fy, fx)
    ang = torch.deg2rad(defocus_angle)
    df = -(p(defocus_u + defocus_v) / 2 + p(defocus_u - defocus_v) / 2 * torch.cos(2 * (theta - p(ang))))
    k1 = math.pi * lam
    k2 = math.pi / 2 * (cs * 1e7) * lam**3
    k3 = torch.atan(amp_contrast / torch.sqrt(1.0 - amp_contrast**2))
    chi = p(k1) * df * s2 + p(k2) * s2**2 - p(k3)
    if phase_shift is not None:
        chi = chi - p(torch.deg2rad(phase_shift))
    out = -torch.sin(chi)
    if bfactor is not None:
        out = out * torch.exp(-p(bfactor) / 4.0 * s2)
    if scale is not None:
        out = out * p(scale)
    return out


def ctf_2d(box: int, apix: Tensor, params: dict[str, Tensor], dtype=torch.float32) -> Tensor:
    """CTF on the centred full 2D grid of a box (the layout of fft2_centered).

    Args:
        box: image side in pixels.
        apix: (B,) pixel size in A of each image.
        params: keys defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast
            and optionally phase_shift, bfactor, scale; each (B,).
    Returns:
        (B, box, box)
    """
    device = apix.device
    fy, fx = freq_grid_2d(box, device=device, dtype=dtype)
    inv = (1.0 / apix.to(dtype))[:, None, None]
    keys = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast", "phase_shift", "bfactor", "scale")
    kw = {k: params[k].to(device=device, dtype=dtype) for k in keys if k in params and params[k] is not None}
    return ctf_from_freqs(fx * inv, fy * inv, **kw)


CTF_FIELDS = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast", "phase_shift", "bfactor",
              "scale")


@dataclass(frozen=True)
class CTF:
    """Per-image CTF parameters as tensors of shape (N,), RELION units (see the module docstring).

    The one typed record the engine, the backprojection and the simulator pass around; the
    optional fields (phase shift, B-factor, scale) are None when absent.
    """

    defocus_u: Tensor  # A
    defocus_v: Tensor  # A
    defocus_angle: Tensor  # degrees
    voltage: Tensor  # kV
    cs: Tensor  # mm
    amp_contrast: Tensor  # fraction
    phase_shift: Tensor | None = None  # degrees
    bfactor: Tensor | None = None  # A^2
    scale: Tensor | None = None

    @classmethod
    def from_arrays(cls, params: Mapping[str, object], dtype=torch.float32) -> "CTF":
        """From a mapping of (N,) arrays/tensors with the field names (e.g. ``CTFParams.as_dict()``)."""
        return cls(**{k: torch.as_tensor(np.asarray(params[k]) if not isinstance(params[k], Tensor) else params[k],
                                         dtype=dtype)
                      for k in CTF_FIELDS if params.get(k) is not None})

    def items(self):
        """(name, tensor) of the fields that are set."""
        return [(k, getattr(self, k)) for k in CTF_FIELDS if getattr(self, k) is not None]

    def __getitem__(self, idx) -> "CTF":
        return CTF(**{k: v[idx] for k, v in self.items()})

    def to(self, device=None, dtype=None) -> "CTF":
        return CTF(**{k: v.to(device=device, dtype=dtype) for k, v in self.items()})

    def __len__(self) -> int:
        return int(self.defocus_u.shape[0])
