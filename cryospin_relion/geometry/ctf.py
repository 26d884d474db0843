"""The contrast transfer function, RELION's formula (src/ctf.h, CTF::getCTF).

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))          [A], V in volts
    df(theta) = -( (dU + dV)/2 + (dU - dV)/2 cos(2 (theta - angle)) )   underfocus < 0
    chi = pi lambda df s^2 + pi/2 Cs lambda^3 s^4 - phase_shift - atan(Q0 / sqrt(1 - Q0^2))
    CTF = -scale * sin(chi) * exp(-B s^2 / 4)

with s the spatial frequency in 1/A, theta its angle from the x axis, defocus
U/V in A, angle and phase shift in degrees, Cs in mm, voltage in kV, amplitude
contrast Q0 as a fraction, B in A^2. At s = 0 the CTF is sin(atan(...)) = Q0 > 0:
protein-positive images stay positive at low frequency.

The formula is written once, in ``ctf_at``, as a function of s^2 and of
(cos 2theta, sin 2theta): the astigmatism term is expanded as
cos(2 (theta - angle)) = cos 2theta cos 2angle + sin 2theta sin 2angle, so the
frequency terms can be computed once per grid and no atan2 is needed (the
backprojection evaluates it at ~10^4 points per image). Entry points: the
centred 2D grid (``ctf_2d``), arbitrary frequencies (``ctf_from_freqs``).
Per-image parameters travel as the typed record ``CTF``.

What the images carry. The record also holds each image's state: plain (the
image is c * projection), CTF-premultiplied (RELION's
``rlnCtfDataAreCtfPremultiplied 1``: the image was multiplied by c once more,
so it is c^2 * projection) or phase-flipped (the sign of c already removed, as
RELION's ``--ctf_phase_flipped`` assumes: |c| * projection). ``projection_factor``
is the one place that turns the CTF values c into the factor m of the
projection in the image (c, c^2 or |c|); ``backprojection_factor`` gives the
factor c^2 / m that the image is multiplied by when it is backprojected (c, 1
or |c|), so that every state adds c^2 * projection to the numerator against
the weight c^2. As in RELION (``Fctf = |c|`` with ``--ctf_phase_flipped``, then
``Fctf *= Fctf`` for premultiplied data), a premultiplied image is c^2 *
projection whether or not the run says phase-flipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin_relion.geometry.fourier import freq_grid_2d

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
    premultiplied: Tensor | None = None  # (N,) bool: image already multiplied by its CTF; None = none is
    phase_flipped: bool = False  # the images' CTF sign was removed (the run's --ctf-phase-flipped)

    @classmethod
    def from_arrays(cls, params: Mapping[str, object] | CTF, dtype=torch.float32) -> CTF:
        """From a mapping of (N,) arrays/tensors with the field names, from anything with such an
        ``as_dict()`` (``io.particles.CTFParams``), or from a record; cast to ``dtype``."""
        if isinstance(params, CTF):
            return params.to(dtype=dtype)
        if hasattr(params, "as_dict"):
            params = params.as_dict()
        pre = params.get("premultiplied")
        if pre is not None:
            pre = torch.as_tensor(np.array(pre) if not isinstance(pre, Tensor) else pre).to(torch.bool)
            pre = pre if bool(pre.any()) else None  # none premultiplied: the plain path
        # np.array copies: the arrays may be read-only views of a STAR table or a memory map
        return cls(**{k: torch.as_tensor(np.array(params[k]) if not isinstance(params[k], Tensor) else params[k],
                                         dtype=dtype)
                      for k in CTF_FIELDS if params.get(k) is not None},
                   premultiplied=pre, phase_flipped=bool(params.get("phase_flipped", False)))

    def items(self):
        """(name, tensor) of the numeric fields that are set (not the images' state)."""
        return [(k, getattr(self, k)) for k in CTF_FIELDS if getattr(self, k) is not None]

    def map(self, fn) -> "CTF":
        """The record with ``fn`` applied to every per-image tensor (numeric fields and ``premultiplied``)."""
        return CTF(**{k: fn(v) for k, v in self.items()},
                   premultiplied=None if self.premultiplied is None else fn(self.premultiplied),
                   phase_flipped=self.phase_flipped)

    def __getitem__(self, idx) -> "CTF":
        return self.map(lambda v: v[idx])

    def to(self, device=None, dtype=None) -> "CTF":
        return self.map(lambda v: v.to(device=device) if v.dtype == torch.bool else v.to(device=device, dtype=dtype))

    def __len__(self) -> int:
        return int(self.defocus_u.shape[0])


def projection_factor(c: Tensor, ctf: CTF) -> Tensor:
    """The factor m that multiplies the projection in each image, from its CTF values c (module docstring).

    Args:
        c: (B, ...) CTF values of B images (``ctf_2d``, ``ctf_at``).
        ctf: the (B,) record of those images; its ``premultiplied`` and ``phase_flipped`` say what they carry.
    Returns:
        (B, ...): c (plain), |c| (phase-flipped), c^2 (premultiplied, phase-flipped or not).
    """
    m = c.abs() if ctf.phase_flipped else c
    return m if ctf.premultiplied is None else torch.where(_per_image(ctf.premultiplied, c), c * c, m)


def backprojection_factor(c: Tensor, ctf: CTF) -> Tensor:
    """c^2 / m, m = ``projection_factor``: what each image is multiplied by before it is backprojected
    against the weight c^2 (c plain, |c| phase-flipped, 1 premultiplied); (B, ...) like c."""
    m = c.abs() if ctf.phase_flipped else c
    return m if ctf.premultiplied is None else torch.where(_per_image(ctf.premultiplied, c), torch.ones_like(c), m)


def _per_image(flags: Tensor, like: Tensor) -> Tensor:
    """(B,) bool -> (B, 1, ...) on ``like``'s device, to broadcast against (B, ...) values."""
    return flags.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def electron_wavelength(voltage_kv: Tensor) -> Tensor:
    """Relativistic electron wavelength in A for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))


def angle_terms(fx: Tensor, fy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(fx^2 + fy^2, cos 2theta, sin 2theta) of frequencies (fx, fy), theta = atan2(fy, fx), without atan2.

    Any unit and shape; at f = 0, theta = 0 (as atan2(0, 0)), i.e. cos 2theta = 1, sin 2theta = 0."""
    r2 = fx**2 + fy**2
    nonzero = r2 > 0
    safe = torch.where(nonzero, r2, torch.ones_like(r2))
    cos2t = torch.where(nonzero, (fx**2 - fy**2) / safe, torch.ones_like(r2))
    sin2t = torch.where(nonzero, 2 * fx * fy / safe, torch.zeros_like(r2))
    return r2, cos2t, sin2t


def ctf_at(s2: Tensor, cos2theta: Tensor, sin2theta: Tensor, ctf: CTF) -> Tensor:
    """RELION's CTF (module docstring) of B images at frequencies given by s^2 and the angle terms.

    Args:
        s2: (B or 1, ...) squared spatial frequency in 1/A^2.
        cos2theta, sin2theta: (B or 1, ...) cos / sin of twice the frequency's angle from x
            (``angle_terms``), broadcast against s2.
        ctf: (B,) parameters. The per-image coefficients are computed in the record's dtype
            and then cast to s2's, so float64 parameters with float32 frequencies keep
            float64 accuracy where it matters (wavelength, phase offsets) at float32 speed.
    Returns:
        (B, ...) in s2's dtype.
    """
    dt = s2.dtype
    nd = max(s2.ndim, cos2theta.ndim, sin2theta.ndim)
    p = lambda t: t.reshape(-1, *([1] * (nd - 1))).to(dt)  # noqa: E731  (B,) -> (B, 1, ...)
    u, v = ctf.defocus_u, ctf.defocus_v
    ang = 2.0 * torch.deg2rad(ctf.defocus_angle)
    hd = (u - v) / 2.0
    df = -(p((u + v) / 2.0) + p(hd * torch.cos(ang)) * cos2theta + p(hd * torch.sin(ang)) * sin2theta)
    lam = electron_wavelength(ctf.voltage)
    k1 = math.pi * lam
    k2 = math.pi / 2.0 * (ctf.cs * 1e7) * lam**3
    q = ctf.amp_contrast
    k3 = torch.atan(q / torch.sqrt(1.0 - q**2))
    if ctf.phase_shift is not None:
        k3 = k3 + torch.deg2rad(ctf.phase_shift)
    chi = s2 * (p(k1) * df + p(k2) * s2) - p(k3)
    out = -torch.sin(chi)
    if ctf.bfactor is not None:
        out = out * torch.exp(-p(ctf.bfactor / 4.0) * s2)
    if ctf.scale is not None:
        out = out * p(ctf.scale)
    return out


def ctf_from_freqs(fx: Tensor, fy: Tensor, ctf: CTF) -> Tensor:
    """CTF of B images at arbitrary frequencies (fx, fy) in 1/A.

    Args:
        fx, fy: (B or 1, ...) frequencies in 1/A.
        ctf: (B,) parameters.
    Returns:
        (B, ...) in fx's dtype.
    """
    return ctf_at(*angle_terms(fx, fy), ctf)


def ctf_2d(box: int, apix: Tensor, params: CTF, dtype=torch.float32) -> Tensor:
    """CTF on the centred full 2D grid of a box (the layout of fft2_centered).

    Args:
        box: image side in pixels.
        apix: (B,) pixel size in A of each image.
        params: (B,) parameters, cast to ``dtype`` on apix's device.
        dtype: the dtype of the computation and of the result.
    Returns:
        (B, box, box)
    """
    device = apix.device
    fy, fx = freq_grid_2d(box, device=device, dtype=dtype)  # cycles per pixel
    r2, cos2t, sin2t = angle_terms(fx, fy)
    inv2 = (1.0 / apix.to(dtype) ** 2)[:, None, None]  # (cycles per pixel)^2 -> 1/A^2
    return ctf_at(r2[None] * inv2, cos2t[None], sin2t[None], params.to(device, dtype))
