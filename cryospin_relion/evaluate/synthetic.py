"""A protein-like test structure made in code: no download, no shared data.

``make_structure`` builds a seeded pseudo-atomic chain: right-handed ideal
alpha-helices (radius 2.3 A, rise 1.5 A, 100 degrees per residue) joined by
random loops (3.8 A CA-CA steps), packed into four globular domains of
different sizes placed at the corners of an irregular tetrahedron. The domain
layout makes the shape asymmetric and chiral at low resolution, the helices
make it chiral at high resolution, so a mirrored reconstruction is detectable.
Each residue has a CA atom (C) and one side-chain pseudo-atom (N or O, 2.4 A
out of the chain), so ``gemmi.DensityCalculatorE`` renders a density with the
texture of a protein at 3-8 A.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DOMAINS", "make_ca_trace", "make_structure", "synthetic_map", "structure_radius"]

# (centre in A, radius in A): four domains of different sizes, no symmetry
DOMAINS = (
    ((0.0, 0.0, 0.0), 13.0),
    ((20.0, 4.0, -3.0), 11.0),
    ((6.0, 19.0, 5.0), 9.5),
    ((4.0, 5.0, 17.0), 8.0),
)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _helix(start: np.ndarray, axis: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """CA positions of a right-handed ideal alpha-helix of n residues starting near ``start``."""
    axis = _unit(axis)
    u = _unit(np.cross(axis, rng.normal(size=3)))
    w = np.cross(axis, u)  # (u, w, axis) right-handed: positive angle = right-handed helix
    k = np.arange(n)
    phi = np.deg2rad(100.0) * k
    pts = start + 2.3 * (np.cos(phi)[:, None] * u + np.sin(phi)[:, None] * w) + 1.5 * k[:, None] * axis
    return pts - 2.3 * u  # first CA at ``start``


def make_ca_trace(n_residues: int = 600, seed: int = 0, domains=DOMAINS) -> np.ndarray:
    """(n, 3) CA coordinates (A) of a compact chain filling ``domains`` in order.

    The domain layout is scaled so that there are about 110 A^3 per residue.
    CA atoms more than 3 residues apart keep >= 4 A from each other.
    """
    rng = np.random.default_rng(seed)
    centres = np.array([c for c, _ in domains], dtype=np.float64)
    radii = np.array([r for _, r in domains], dtype=np.float64)
    scale = (n_residues * 110.0 * 3 / (4 * np.pi) / (radii**3).sum()) ** (1 / 3)
    centres, radii = centres * scale, radii * scale
    share = radii**3 / (radii**3).sum()
    counts = np.maximum(10, np.round(share * n_residues)).astype(int)
    counts[-1] = max(10, n_residues - counts[:-1].sum())
    P = np.zeros((n_residues + 4096, 3))
    cnt = 0
    cur = centres[0] + rng.normal(size=3)

    def clearance(q: np.ndarray, recent: int = 3) -> np.ndarray:
        """(m,) smallest distance of each candidate point to CAs placed before the last ``recent``."""
        if cnt <= recent:
            return np.full(len(q), np.inf)
        d = np.linalg.norm(P[: cnt - recent][None, :, :] - q[:, None, :], axis=-1)
        return d.min(1)

    def push(q: np.ndarray) -> None:
        nonlocal cnt, cur
        P[cnt:cnt + len(q)] = q
        cnt += len(q)
        cur = q[-1]

    for d in range(len(centres)):
        c, r = centres[d], radii[d]
        target, placed, stall = counts[d], 0, 0
        while placed < target and stall < 200:
            if rng.random() < 0.65 and target - placed >= 8:
                n = int(min(target - placed, rng.integers(8, 17)))
                for _ in range(20):
                    axis = _unit(c - cur + rng.normal(scale=0.6 * r, size=3))
                    start = cur + 3.8 * _unit(axis + rng.normal(scale=0.5, size=3))
                    h = _helix(start, axis, n, rng)
                    inside = (np.linalg.norm(h - c, axis=1) <= r + 2.0).all()
                    if inside and (clearance(h, recent=1) >= 4.0).all():
                        push(h)
                        placed += n
                        stall = 0
                        break
                else:
                    stall += 1
                continue
            steps = rng.normal(size=(32, 3)) + 0.35 * _unit(c - cur)
            cand = cur + 3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True)
            good = (np.linalg.norm(cand - c, axis=1) <= r + 2.0) & (clearance(cand) >= 4.0)
            if good.any():
                push(cand[np.flatnonzero(good)[0]][None])
                placed += 1
                stall = 0
            else:
                stall += 1
                if stall % 10 == 0:
                    r += 1.0  # crowded: let the domain grow a little
        if d + 1 < len(centres):  # linker towards the next domain
            nxt = centres[d + 1]
            while np.linalg.norm(nxt - cur) > radii[d + 1] * 0.8:
                steps = _unit(nxt - cur) + 0.6 * rng.normal(size=(32, 3))
                cand = cur + 3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True)
                push(cand[int(np.argmax(np.minimum(clearance(cand), 4.0) - 0.01 * np.linalg.norm(cand - nxt, axis=1)))][None])
    return P[:cnt].copy()


def make_structure(n_residues: int = 600, seed: int = 0, bfactor: float = 20.0):
    """A gemmi.Structure with one chain of pseudo-residues (CA + one side-chain atom each)."""
    import gemmi

    ca = make_ca_trace(n_residues, seed)
    rng = np.random.default_rng(seed + 1)
    n = len(ca)
    st = gemmi.Structure()
    st.name = f"synthetic_{seed}"
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    for i in range(n):
        prev = ca[max(i - 1, 0)]
        nxt = ca[min(i + 1, n - 1)]
        out = ca[i] - (prev + nxt) / 2
        if np.linalg.norm(out) < 0.5:
            out = rng.normal(size=3)
        side = ca[i] + 2.4 * _unit(out + 0.3 * rng.normal(size=3))
        res = gemmi.Residue()
        res.name = "ALA"
        res.seqid = gemmi.SeqId(i + 1, " ")
        res.entity_type = gemmi.EntityType.Polymer
        for name, el, pos in (("CA", "C", ca[i]), ("CB", "N" if i % 3 else "O", side)):
            a = gemmi.Atom()
            a.name = name
            a.element = gemmi.Element(el)
            a.pos = gemmi.Position(*map(float, pos))
            a.b_iso = float(bfactor)
            a.occ = 1.0
            res.add_atom(a)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    return st


def structure_radius(st) -> float:
    """Largest distance (A) of an atom from the centre of mass of the first model."""
    m = st[0]
    com = m.calculate_center_of_mass()
    xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for ch in m for r in ch for a in r])
    return float(np.sqrt(((xyz - [com.x, com.y, com.z]) ** 2).sum(-1)).max())


def synthetic_map(box: int, apix: float, n_residues: int = 600, seed: int = 0) -> np.ndarray:
    """Density (box,)^3 at ``apix`` of ``make_structure(n_residues, seed)``."""
    from cryospin_relion.evaluate.simulate import structure_to_map

    return structure_to_map(make_structure(n_residues, seed), box, apix)
