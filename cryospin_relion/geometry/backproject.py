"""Direct Fourier reconstruction: CTF-weighted backprojection with Wiener normalisation.

Each image's rfft2 samples (the kx >= 0 half plane inside |k| <= n/2) are placed,
as RELION's BackProjector does, at pad * (A^T k) on a (D, D, D) centred grid,
D = pad * n, and splatted trilinearly as numerator sum CTF * X and weight sum
CTF^2 (an image that already carries CTF^2 * projection, RELION's
CTF-premultiplied data, is added as it is; a phase-flipped one times |CTF|:
``ctf.backprojection_factor``). The missing half space follows from Friedel symmetry. The volume
(``volume_from_accumulator``) is IFFT(num / (weight + tau)), cropped to n and
divided by the sinc^2 response of trilinear splatting (gridding correction).

(``pad_images=True`` instead zero-pads each image to D in real space and inserts
all of its oversampled transform. That is accurate for images whose content
lies inside the box, but CTF-modulated images are delocalised beyond it and the
in-between samples are then wrong: amplitudes fall to ~0.5 near Nyquist at
2.5 um defocus. It is kept for comparison only.)

Speed (``insert_images``): the plane's sample set and its CTF helper terms are
computed once per (n, D, device) (``ctf.angle_terms``: no atan2 per image);
per-image arithmetic (phase ramp, CTF, trilinear weights) runs in float32 on
those P points only. For batches that
touch more points than the grid holds, each worker scatters into float32
staging grids of the half space kz >= 0 (points with kz < 0 go in as their
Friedel mates), which are then added to the float64 sums, so long runs still
accumulate in float64; on CPU the batch is split over ``threads`` Python threads,
each with its own staging grids (torch releases the GIL inside its kernels).
Results agree with a float64 evaluation to ~1e-6.
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin_relion.geometry.ctf import CTF, angle_terms, backprojection_factor, ctf_at
from cryospin_relion.geometry.sampling import sample_trilinear
from cryospin_relion.geometry.slicing import sinc2_window_3d

# default of insert_images(pad_images=...): False = RELION's way (see the module docstring)
PAD_IMAGES = False
# points (x 8 trilinear corners) handled per step; bounds the temporaries to ~100 MB
_POINTS_PER_STEP = 1 << 22
# points per trilinear-splat group on CPU: keeps its ~10 float32 temporaries within L2
_SPLAT_POINTS = 1 << 15


@dataclass
class Accumulator:
    """Running sums on the (D, D, D) centred grid (flattened): num (D^3, 2) real/imag, weight (D^3,)."""

    num: Tensor
    weight: Tensor
    box: int
    pad: int

    @property
    def size(self) -> int:
        return self.box * self.pad

    @classmethod
    def zeros(cls, box: int, pad: int = 2, device=None, dtype=torch.float64) -> "Accumulator":
        D = box * pad
        return cls(torch.zeros(D**3, 2, device=device, dtype=dtype), torch.zeros(D**3, device=device, dtype=dtype), box, pad)

    def __iadd__(self, other: "Accumulator") -> "Accumulator":
        self.num += other.num
        self.weight += other.weight
        return self


@dataclass(frozen=True)
class _Plane:
    """The P points of an image's rfft2 half plane (kx >= 0) inside the circle |k| <= m/2,
    m = the FFT size, and where they land on the (D, D, D) grid (scaled by ``scale`` = D / m).

    Ordered core first: the first ``core`` points have scale * |k| <= D/2 - 3, so at any
    rotation they and their trilinear corners stay 2 voxels inside the grid; the
    rest (the rim) need bounds checks.

    sel: (P,) int64 flat index into the *unshifted* rfft2 output (m, m//2+1).
    k: (2, P) float32 (kx, ky) in cycles per m pixels.
    kpos: (2, P) float32 scale * k, in voxels of the D grid.
    r2: (P,) float32 kx^2 + ky^2.
    cos2t, sin2t: (P,) float32 cos / sin of twice the polar angle (for astigmatism).
    half: (P,) float32 0.5 on the kx = 0 and kx = m/2 columns (they hold k and -k), else 1.
    core: number of core points.
    """

    m: int
    sel: Tensor
    k: Tensor
    kpos: Tensor
    r2: Tensor
    cos2t: Tensor
    sin2t: Tensor
    half: Tensor
    core: int


@functools.lru_cache(maxsize=16)
def _plane(m: int, D: int, device: torch.device) -> _Plane:
    scale = D / m
    ky = torch.arange(m, dtype=torch.float64) - m // 2
    kx = torch.arange(m // 2 + 1, dtype=torch.float64)
    KY, KX = torch.meshgrid(ky, kx, indexing="ij")
    r2 = KX**2 + KY**2
    keep = r2 <= (m / 2) ** 2
    kxk, kyk, r2k = KX[keep], KY[keep], r2[keep]
    inner = r2k * scale**2 <= max(D // 2 - 3, 0) ** 2
    order = torch.cat([torch.nonzero(inner)[:, 0], torch.nonzero(~inner)[:, 0]])
    kxk, kyk, r2k = kxk[order], kyk[order], r2k[order]
    rows = torch.remainder(kyk.long(), m)  # unshifted row of ky
    sel = rows * (m // 2 + 1) + kxk.long()
    _, cos2t, sin2t = angle_terms(kxk, kyk)
    half = torch.where((kxk == 0) | (2 * kxk == m), 0.5, 1.0)
    f32 = dict(device=device, dtype=torch.float32)
    k = torch.stack([kxk, kyk])
    return _Plane(m, sel.to(device), k.to(**f32), (k * scale).to(**f32), r2k.to(**f32), cos2t.to(**f32),
                  sin2t.to(**f32), half.to(**f32), int(inner.sum()))


def _rfft_padded_unshifted(images: Tensor, D: int) -> Tensor:
    """(B, n, n) real -> (B, D, D//2+1) rfft2 of the zero-padded image with its centre
    (pixel n // 2) at the origin; rows in FFT order (ky = row for row < D/2, else row - D)."""
    B, n = images.shape[0], images.shape[-1]
    c = n // 2
    pad = images.new_zeros(B, D, D)
    # pixel y goes to row (y - c) mod D: the ifftshift of the centred padding, without the copy
    pad[:, : n - c, : n - c] = images[:, c:, c:]
    pad[:, : n - c, D - c :] = images[:, c:, :c]
    pad[:, D - c :, : n - c] = images[:, :c, c:]
    pad[:, D - c :, D - c :] = images[:, :c, :c]
    return torch.fft.rfft2(pad)


def _ctf_points(plane: _Plane, apix: Tensor, ctf: CTF) -> Tensor:
    """RELION's CTF (``ctf.ctf_at``) at the plane's P points, (B, P) float32.

    Frequencies are k / (apix * m) in 1/A; the per-image coefficients are computed in float64.
    """
    inv2 = 1.0 / (apix.to(torch.float64) * plane.m) ** 2
    s2 = plane.r2[None] * inv2[:, None].to(torch.float32)  # (B, P) 1/A^2
    return ctf_at(s2, plane.cos2t[None], plane.sin2t[None], ctf.to(plane.k.device, torch.float64))


def _corners(pos: Tensor, D: int) -> tuple[Tensor, Tensor]:
    """Flat grid indices and trilinear weights of the 8 corners of each point.

    Args:
        pos: (B, 3, P) float32 (x, y, z) grid coordinates.
    Returns:
        idx: (8, B, P) int64 into the flattened (z, y, x) grid, clamped in range;
        w: (8, B, P) float32 weights, 0 for corners outside the grid.
    """
    lo_i, hi_i, lo_w, hi_w = [], [], [], []
    for axis, stride in ((2, D * D), (1, D), (0, 1)):  # z, y, x
        p = pos[:, axis]
        fl = torch.floor(p)
        f = p - fl
        i = fl.long()
        lo_w.append((1.0 - f) * ((i >= 0) & (i < D)))
        hi_w.append(f * ((i >= -1) & (i < D - 1)))
        lo_i.append(i.clamp(0, D - 1) * stride)
        hi_i.append((i + 1).clamp(0, D - 1) * stride)
    iz = torch.stack([lo_i[0], hi_i[0]])[:, None, None]
    iy = torch.stack([lo_i[1], hi_i[1]])[None, :, None]
    ix = torch.stack([lo_i[2], hi_i[2]])[None, None, :]
    wz = torch.stack([lo_w[0], hi_w[0]])[:, None, None]
    wy = torch.stack([lo_w[1], hi_w[1]])[None, :, None]
    wx = torch.stack([lo_w[2], hi_w[2]])[None, None, :]
    B, P = pos.shape[0], pos.shape[2]
    idx = ((iz + iy) + ix).reshape(8, B, P)
    w = ((wz * wy) * wx).reshape(8, B, P)
    return idx, w


def _insert_chunk(
    D: int,
    plane: _Plane,
    images: Tensor,
    rotations: Tensor,
    translations_px: Tensor | None,
    apix: Tensor,
    ctf: CTF | None,
    targets: tuple,
    staged: bool,
) -> None:
    """Insert one chunk of images into ``targets``.

    ``staged``: targets = (real, imag, weight) flat float32 staging grids
    (``_staging_shape``); else targets = (acc.num viewed flat, interleaved re/im;
    acc.weight), scattered with bounds checks.
    """
    m = plane.m
    if m == images.shape[-1]:  # the image's own samples, as RELION inserts them
        ft = torch.fft.rfft2(torch.fft.ifftshift(images.to(torch.float32), dim=(-2, -1)))
    else:  # zero-padded to m = D (oversampled in the plane)
        ft = _rfft_padded_unshifted(images.to(torch.float32), m)
    ft = ft.flatten(1)[:, plane.sel]  # (B, P) complex64
    if translations_px is not None:
        # undo the translation t: multiply by exp(+2 pi i k.t / m)
        t = translations_px.to(torch.float64) * (2.0 * math.pi / m)
        ph = torch.addmm(t[:, 1:2].float() * plane.k[1][None], t[:, 0:1].float(), plane.k[0][None])
        ft = ft * torch.polar(torch.ones_like(ph), ph)
    if ctf is not None:
        c = _ctf_points(plane, apix, ctf)
        cw = c * plane.half
        bw = backprojection_factor(c, ctf) * plane.half  # c plain, 1 premultiplied, |c| phase-flipped
        re, im, wt = ft.real * bw, ft.imag * bw, c * cw
    else:
        re, im = ft.real * plane.half, ft.imag * plane.half
        wt = plane.half.expand_as(re)
    A2t = rotations[:, :2, :].transpose(1, 2).to(torch.float32)  # (B, 3, 2)
    pos = torch.matmul(A2t, plane.kpos) + float(D // 2)  # (B, 3, P) grid coordinates (x, y, z)
    if staged:
        pc = plane.core
        _splat_staged(D, pos[..., :pc], re[:, :pc], im[:, :pc], wt[:, :pc], targets, checked=False)
        _splat_staged(D, pos[..., pc:], re[:, pc:], im[:, pc:], wt[:, pc:], targets, checked=True)
        return
    _splat_checked(D, pos, re, im, wt, targets)


def _splat_checked(D: int, pos: Tensor, re: Tensor, im: Tensor, wt: Tensor, targets: tuple[Tensor, Tensor]) -> None:
    """Trilinear scatter of (B, P) values at (B, 3, P) positions straight into the
    accumulator (``targets`` = acc.num viewed flat, acc.weight), dropping corners outside the grid."""
    idx, w = _corners(pos, D)
    idx = idx.reshape(-1)
    vr, vi, vw = (re[None] * w).reshape(-1), (im[None] * w).reshape(-1), (wt[None] * w).reshape(-1)
    num_flat, weight = targets
    dt = num_flat.dtype
    i2 = idx * 2
    num_flat.scatter_add_(0, i2, vr.to(dt))
    num_flat.scatter_add_(0, i2 + 1, vi.to(dt))
    weight.scatter_add_(0, idx, vw.to(dt))


def _staging_shape(D: int) -> tuple[int, int, int]:
    """(z, y, x) shape of a staging grid: the half space z in [D/2, D + 1] (kz >= 0) by
    [-1, D + 1]^2; index = (z - D/2, y + 1, x + 1). See ``_fold_staging``."""
    return D // 2 + 2, D + 3, D + 3


def _splat_staged(D: int, pos: Tensor, re: Tensor, im: Tensor, wt: Tensor, grids: tuple[Tensor, Tensor, Tensor],
                  checked: bool) -> None:
    """Trilinear scatter of (B, P) values at (B, 3, P) positions into three flat float32
    staging grids of shape ``_staging_shape(D)`` (real, imag, weight).

    Points with kz < 0 are stored as their Friedel mates (corner c -> D - c, conjugate
    value), which ``accumulator_spectra`` completes exactly as the original point, so
    the staging grids (and the cache traffic) cover half the space.

    checked=False: every point must lie in [2, D - 2]^3 (the plane's core points).
    checked=True: corners outside [0, D - 1] in the point's own frame get weight 0,
    as in ``_splat_checked``; mirrored corners at D are folded onto 0 later.
    The batch is worked through in groups of ~``_SPLAT_POINTS`` points so that the
    temporaries stay in the CPU's L2 cache.
    """
    h = D // 2
    _, E, _ = _staging_shape(D)
    B, P = re.shape
    if P == 0 or B == 0:
        return
    step = max(1, _SPLAT_POINTS // P) if pos.device.type == "cpu" else B
    gr, gi, gw = grids
    offsets = [dz * E * E + dy * E + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    origin = -h * E * E + E + 1  # index of grid point (0, 0, 0) in (z, y, x) = (h, -1, -1) units
    for a in range(0, B, step):
        p = pos[a : a + step]
        neg = p[:, 2] < h  # (b, P): kz < 0 -> Friedel mate
        r, t = re[a : a + step], wt[a : a + step]
        m = torch.where(neg, -im[a : a + step], im[a : a + step])
        if not checked:
            p = torch.where(neg[:, None], float(D) - p, p)
            fl = torch.floor(p)
            f = p - fl
            i = fl.long()
            base = (i[:, 2] * E + i[:, 1]) * E + i[:, 0] + origin  # (b, P)
            sgn = None
            lo = [1.0 - f[:, ax] for ax in range(3)]
            hi = [f[:, ax] for ax in range(3)]
        else:
            fl = torch.floor(p)
            f = p - fl
            i = fl.long()
            lo = [(1.0 - f[:, ax]) * ((i[:, ax] >= 0) & (i[:, ax] < D)) for ax in range(3)]
            hi = [f[:, ax] * ((i[:, ax] >= -1) & (i[:, ax] < D - 1)) for ax in range(3)]
            # corner c -> D - c for mates: index = base + sgn * offset
            j = torch.where(neg[:, None], D - i, i)
            base = (j[:, 2] * E + j[:, 1]) * E + j[:, 0] + origin
            sgn = torch.where(neg, -1, 1)
        c = 0
        for wz in (lo[2], hi[2]):
            for wy in (lo[1], hi[1]):
                wzy = wz * wy
                for wx in (lo[0], hi[0]):
                    w = wzy * wx
                    idx = (base + offsets[c] if sgn is None else torch.add(base, sgn, alpha=offsets[c])).reshape(-1)
                    c += 1
                    gr.scatter_add_(0, idx, (r * w).reshape(-1))
                    gi.scatter_add_(0, idx, (m * w).reshape(-1))
                    gw.scatter_add_(0, idx, (t * w).reshape(-1))


def _fold_staging(acc: Accumulator, grids: Tensor) -> None:
    """Add (3, *_staging_shape(D)) staging grids to ``acc``: index D folds onto 0 on each
    axis (the Friedel partner of index 0 is 0 on the even grid), margins hold zeros."""
    D = acc.size
    h = D // 2
    g = grids.view(3, *_staging_shape(D))
    g[..., 1] += g[..., D + 1]  # x = D -> 0
    g[..., 1, :] += g[..., D + 1, :]  # y = D -> 0
    num = acc.num.view(D, D, D, 2)
    weight = acc.weight.view(D, D, D)
    for dst, src in ((slice(h, D), slice(0, h)), (slice(0, 1), slice(h, h + 1))):  # z = D -> 0
        part = g[:, src, 1 : D + 1, 1 : D + 1]
        num[dst, ..., 0].add_(part[0])
        num[dst, ..., 1].add_(part[1])
        weight[dst].add_(part[2])


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor(threads: int) -> ThreadPoolExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR._max_workers < threads:
            _EXECUTOR = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="backproject")
        return _EXECUTOR


def insert_images(
    acc: Accumulator,
    images: Tensor,
    rotations: Tensor,
    translations_px: Tensor | None,
    apix: Tensor,
    ctf: CTF | None,
    threads: int | None = None,
    pad_images: bool = PAD_IMAGES,
) -> None:
    """Backproject real images into ``acc`` (in place).

    Args:
        acc: accumulator for box n and padding pad.
        images: (B, n, n) real particle images.
        rotations: (B, 3, 3) RELION A.
        translations_px: (B, 2) translation that *produced* each image from the
            centred projection (= -origin / apix); it is undone here. None = 0.
        apix: (B,) pixel size in A (for the CTF).
        ctf: (B,) CTF parameters, or None (no CTF).
        threads: CPU worker threads the batch is split over (default
            torch.get_num_threads()); the sums do not depend on it beyond float
            rounding. While inserting, torch's intra-op threads are set to 1 (and
            restored afterwards): the workers are the parallelism.
        pad_images: zero-pad each image to D in real space and insert all D^2/2
            samples of its oversampled transform; default (False) inserts the
            image's own n^2/2 samples at pad-scaled positions, as RELION does.
    """
    D = acc.size
    B = images.shape[0]
    if B == 0:
        return
    device = acc.num.device
    plane = _plane(D if pad_images else acc.box, D, device)
    P = plane.sel.numel()
    images = images.to(device)
    rotations = rotations.to(device)
    apix = torch.as_tensor(apix, device=device).reshape(-1).expand(B)
    if translations_px is not None:
        translations_px = translations_px.to(device)
    if ctf is not None:
        ctf = ctf.map(lambda v: torch.as_tensor(v, device=device).reshape(-1).expand(B))
    if threads is None:
        threads = torch.get_num_threads() if device.type == "cpu" else 1
    threads = max(1, int(threads)) if device.type == "cpu" else 1
    # float32 staging pays off once a worker's images touch >= 1/8 as many points as the grid holds
    per_worker = max(1, -(-(D**3) // (64 * P)))  # images
    staged = B >= per_worker
    workers = max(1, min(threads, B // per_worker)) if staged else 1
    step = max(1, min(_POINTS_PER_STEP // (8 * P), -(-B // workers)))
    chunks = [slice(a, min(a + step, B)) for a in range(0, B, step)]

    def run(sl: slice, targets, staged: bool) -> None:
        _insert_chunk(
            D, plane, images[sl], rotations[sl], None if translations_px is None else translations_px[sl],
            apix[sl], None if ctf is None else ctf[sl], targets, staged,
        )

    size = math.prod(_staging_shape(D))

    def work(my_chunks: list[slice]) -> Tensor:
        grids = torch.zeros(3, size, device=device, dtype=torch.float32)
        for sl in my_chunks:
            run(sl, (grids[0], grids[1], grids[2]), True)
        return grids

    # Parallelism comes from the workers alone: torch's own intra-op threads would
    # compete with them, and spin-waiting intra-op threads are very slow on busy CPUs.
    prev = torch.get_num_threads()
    if device.type == "cpu" and prev != 1:
        torch.set_num_threads(1)
    try:
        if not staged:
            for sl in chunks:
                run(sl, (acc.num.view(-1), acc.weight), False)
            return
        if workers == 1:
            parts = [work(chunks)]
        else:
            ex = _executor(workers)
            futures = [ex.submit(work, chunks[w::workers]) for w in range(workers)]
            parts = [f.result() for f in futures]
        for g in parts:
            _fold_staging(acc, g)
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


def _flip3(x: Tensor) -> Tensor:
    """x(-K) on a centred even (D, D, D) grid."""
    return torch.roll(torch.flip(x, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))


def accumulator_spectra(acc: Accumulator) -> tuple[Tensor, Tensor]:
    """Friedel-completed (D, D, D) complex numerator and real weight."""
    D = acc.size
    num = torch.view_as_complex(acc.num.reshape(D, D, D, 2).contiguous())
    w = acc.weight.reshape(D, D, D)
    return num + _flip3(num).conj(), w + _flip3(w)


def symmetrise_accumulator(acc: Accumulator, operators: Tensor, threads: int | None = None) -> None:
    """Make ``acc`` the sums of every inserted image at every pose A @ S of ``operators`` (G, 3, 3), in place.

    An image inserted at pose A @ S puts its sample of frequency k at (A S)^T k = S^T (A^T k): the
    C1 sums moved by p -> S^T p. So the symmetrised sums are sum_g acc(S_g q) at every grid point q,
    sampled trilinearly from the Friedel-completed spectra (RELION's BackProjector::symmetrise does the
    same on its grid). One resampling of the grid inside the Nyquist sphere per operator, instead of
    inserting every image G times (60x for I). Operators that map grid points onto grid points (C4, O)
    give the G-fold insertion's sums exactly; others differ by the second interpolation (white-noise
    images, D7: FSC >= 0.978 to 0.8 Nyquist; relion_reconstruct --sym, which does the same, agrees to
    0.9992-0.9996 for C4, D7, T, O, I, against 0.998-0.999 with the G-fold insertion: tests/relion/).
    The identity alone leaves ``acc`` unchanged.
    """
    ops = torch.as_tensor(operators, dtype=torch.float64).reshape(-1, 3, 3)
    if ops.shape[0] == 1 and torch.equal(ops[0], torch.eye(3, dtype=torch.float64)):
        return
    D = acc.size
    num, w = accumulator_spectra(acc)  # Hermitian: both halves, so any rotation finds its samples
    grid = torch.stack([num.real, num.imag, w]).to(acc.num.dtype)  # (3, D, D, D)
    c = torch.arange(D, device=grid.device, dtype=grid.dtype) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    q = torch.stack([x, y, z], -1).reshape(-1, 3)  # (D^3, 3) (x, y, z) of the flat (z, y, x) grid
    keep = (q * q).sum(-1) <= (D // 2 + 1) ** 2  # the maps use |k| <= D/2 only: half the cube
    q = q[keep]
    part = torch.zeros(3, len(q), dtype=grid.dtype, device=grid.device)
    for S in ops.to(grid.device, grid.dtype):
        part += sample_trilinear(grid, q @ S.T, threads)  # acc(S q), row vectors: q S^T
    # stored as halves of a Hermitian spectrum, as the insertion leaves them (_half_spectra adds the mirror)
    acc.num.zero_()
    acc.weight.zero_()
    acc.num[keep] = 0.5 * part[:2].T
    acc.weight[keep] = 0.5 * part[2]


def _half_spectra(acc: Accumulator) -> tuple[Tensor, Tensor, Tensor]:
    """Friedel-completed numerator and weight on the half space kx = 0 .. D/2 only,
    in FFT order (ready for irfftn; no shifts needed).

    Returns:
        num: (D, D, D/2 + 1) complex; z and y in FFT order (index j <-> k = j for
            j < D/2, else j - D), x = kx;
        weight: (D, D, D/2 + 1) real, same layout;
        k2: (D, D, D/2 + 1) squared frequency radius |k|^2 in grid units.
    """
    D = acc.size
    h = D // 2
    dev = acc.num.device
    num = torch.view_as_complex(acc.num.view(D, D, D, 2))
    w = acc.weight.view(D, D, D)
    j = torch.arange(D, device=dev)
    zy = torch.remainder(j + h, D)  # centred index of the FFT-order index j
    zy_m = torch.remainder(h - j, D)  # centred index of -k
    kx = torch.arange(h + 1, device=dev)
    xs = torch.remainder(kx + h, D)  # kx = 0..h (h is stored at index 0, as -h)
    xs_m = torch.remainder(h - kx, D)
    direct = (zy[:, None, None], zy[None, :, None], xs[None, None, :])
    mirror = (zy_m[:, None, None], zy_m[None, :, None], xs_m[None, None, :])
    kf = torch.where(j < h, j, j - D).to(w.dtype)
    k2 = kf[:, None, None] ** 2 + kf[None, :, None] ** 2 + kx.to(w.dtype)[None, None, :] ** 2
    return num[direct] + num[mirror].conj(), w[direct] + w[mirror], k2


def volume_from_accumulator(acc: Accumulator, tau: float = 1e-3) -> Tensor:
    """Real-space map (n, n, n) from an accumulator: Wiener-normalised, inverse FFT, gridding-corrected.

    Args:
        acc: the sums.
        tau: Wiener constant, as a fraction of the mean weight inside the
            Nyquist sphere (regularises weakly sampled voxels).
    Returns:
        (n, n, n) float32 map, MRC order (z, y, x), centre at n // 2.
    """
    D, n = acc.size, acc.box
    h = D // 2
    num, w, k2 = _half_spectra(acc)  # the spectrum is Hermitian: the kx >= 0 half determines the map
    inside = k2 <= h**2
    mult = torch.full((h + 1,), 2.0, dtype=w.dtype, device=w.device)  # kx planes 1..h-1 stand for two
    mult[0] = mult[h] = 1.0
    cnt = (inside * mult).sum()
    t = tau * ((w * inside * mult).sum() / cnt.clamp_min(1)).clamp_min(1e-30)
    spec = torch.where(inside, num / (w + t), torch.zeros_like(num))
    vol = torch.fft.irfftn(spec, s=(D, D, D), dim=(0, 1, 2))  # origin at index 0
    c = torch.remainder(torch.arange(n, device=vol.device) - n // 2, D)  # the box around the origin
    vol = vol[c[:, None, None], c[None, :, None], c[None, None, :]]
    return (vol / sinc2_window_3d(n, D, vol.device, vol.dtype)).to(torch.float32)
