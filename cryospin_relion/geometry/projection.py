"""The forward model in real space: projection of a map at RELION poses, with CTF.

image = IFFT( CTF * ramp(-origin) * slice_A(FFT(volume)) )

so that ``project`` reproduces RELION's ``relion_project`` for the same STAR
angles, origins and CTF (tests/relion/test_relion_project.py).
"""

from __future__ import annotations

from torch import Tensor

from cryospin_relion.geometry.fourier import ifft2_centered
from cryospin_relion.geometry.shifts import phase_ramp
from cryospin_relion.geometry.slicing import extract_slices


def project_spectrum(
    spectrum: Tensor,
    rotations: Tensor,
    box: int,
    translations_px: Tensor | None = None,
    ctf: Tensor | None = None,
) -> Tensor:
    """Projection images from a prepared spectrum (``slicing.volume_to_projector``).

    Args:
        spectrum: (D, D, D) complex centred spectrum of the padded volume.
        rotations: (B, 3, 3) RELION A.
        box: image side n.
        translations_px: (B, 2) content translation in pixels (= -origin / apix), or None.
        ctf: (B, n, n) CTF on the centred grid (``ctf.ctf_2d``), or None.
    Returns:
        (B, n, n) real images.
    """
    ft = extract_slices(spectrum, rotations, box)
    if ctf is not None:
        ft = ft * ctf
    if translations_px is not None:
        ft = ft * phase_ramp(translations_px.to(ft.real.dtype), box)
    return ifft2_centered(ft).real


__all__ = ["project_spectrum"]
