"""The particle table: one in-memory view of RELION or cryoSPARC particle metadata.

Every adapter converts to this table at the edge, so nothing downstream knows
about Euler angles, rotation vectors or pixel origins:

- rotations: RELION's matrix A (volume coordinates -> image coordinates), (N, 3, 3)
- shifts_A: RELION's origin (rlnOriginXAngst, rlnOriginYAngst) in Angstrom, (N, 2);
  the particle image is the centred projection shifted by *minus* this origin.
- ctf: RELION's CTF parameters per particle (defocus in A, angle in degrees), and
  what the images carry: ``premultiplied`` (rlnCtfDataAreCtfPremultiplied, per
  particle) and ``phase_flipped`` (a run option); see ``geometry/ctf.py``.
- images: stack path (resolved) + 0-based index per particle.

``raw`` keeps the source table (pandas DataFrames for STAR, a
``cryosparc.dataset.Dataset`` for .cs) so writers can pass every original
column through.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

# where a table's scores go: (STAR label, cryoSPARC .cs field) of ``confidence`` and ``fit_loss``.
# rlnMaxValueProbDistribution is RELION's own per-particle "probability of the best pose" column (in [0, 1],
# larger = better: RELION's Subset selection and relion_star_handler --select can cut on it); the loss is not a
# log-likelihood (RELION's rlnLogLikeliContribution is larger = better), hence an own label. cryoSPARC has
# no pose-confidence field: the confidence goes to an own ``cryospin`` slot, the loss to
# ``alignments3D/error`` (cryoSPARC's residual at the chosen pose, also smaller = better; other units).
SCORE_COLUMNS = {"confidence": ("rlnMaxValueProbDistribution", "cryospin/confidence"),
                 "fit_loss": ("rlnCryospinLoss", "alignments3D/error")}

# where a table's ``classes`` go. STAR: RELION's rlnClassNumber, 1-based (classes + 1). .cs: the fields of cryoSPARC's
# own classification outputs (heterogeneous refinement's particles; pyem's csparc2star reads alignments3D/class + 1 as
# rlnClassNumber): alignments3D/class u4 0-based, alignments3D/class_posterior f4 (1.0: a hard assignment) and
# alignments3D/class_ess f4 (effective number of classes of the posterior: 1.0 when hard).
STAR_CLASS = "rlnClassNumber"
CS_CLASS_FIELDS = [("alignments3D/class", "u4"), ("alignments3D/class_posterior", "f4"),
                   ("alignments3D/class_ess", "f4")]


@dataclass
class CTFParams:
    """Per-particle CTF parameters in RELION units, arrays of shape (N,)."""

    defocus_u: np.ndarray  # A
    defocus_v: np.ndarray  # A
    defocus_angle: np.ndarray  # degrees, astigmatism angle from x
    voltage: np.ndarray  # kV
    cs: np.ndarray  # mm
    amp_contrast: np.ndarray  # fraction
    phase_shift: np.ndarray  # degrees
    bfactor: np.ndarray  # A^2 (0 = no envelope)
    scale: np.ndarray  # rlnCtfScalefactor (1 by default)
    # (N,) bool: rlnCtfDataAreCtfPremultiplied (the image was multiplied by its CTF); None = all False
    premultiplied: np.ndarray | None = None
    phase_flipped: bool = False  # the images' CTF sign was removed (a run option, not a file column)

    def subset(self, idx: np.ndarray) -> "CTFParams":
        return CTFParams(**{k: (v if v is None or k == "phase_flipped" else np.asarray(v)[idx])
                            for k, v in self.__dict__.items()})

    def as_dict(self) -> dict[str, np.ndarray]:
        """The fields that are set (``premultiplied`` None is left out)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ParticleTable:
    """Particle metadata, converted to RELION's conventions (see docs/conventions.md)."""

    source_file: str  # the STAR or .cs this table was read from
    source_format: str  # "star31", "star30" or "cs"
    stack_paths: np.ndarray  # (N,) str: resolved path of each particle's stack
    stack_indices: np.ndarray  # (N,) int64: 0-based index in that stack
    box: int  # image side in pixels (square)
    apix: np.ndarray  # (N,) float64: pixel size of the images in A
    ctf: CTFParams | None  # None when the input has no CTF (allowed with --no-ctf)
    rotations: np.ndarray | None  # (N, 3, 3) float64 RELION A, None if no poses
    shifts_A: np.ndarray | None  # (N, 2) float64 RELION origin in A, None if no poses
    subset: np.ndarray | None  # (N,) int: RELION rlnRandomSubset (1/2), None if absent
    optics_group: np.ndarray  # (N,) int: 1-based optics group (1 for .cs / 3.0 files)
    sign: float = 1.0  # multiply images by this to get protein-positive (cryoSPARC blob/sign)
    raw: Any = None  # source tables, for writers that keep every original column
    extra: dict = field(default_factory=dict)
    # per-particle scores of a run (lifecycle/scores.py), written as SCORE_COLUMNS; None = not scored
    confidence: np.ndarray | None = None  # (N,) pose confidence in [0, 1], larger = better determined
    fit_loss: np.ndarray | None = None  # (N,) the run's loss at the final pose, smaller = better fit
    # (N,) int64 0-based class of each particle of a run with K > 1 classes, written as STAR_CLASS / CS_CLASS_FIELDS;
    # None = not classified (an input's own class column then passes through as it was)
    classes: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.stack_indices))

    @property
    def has_poses(self) -> bool:
        return self.rotations is not None

    def with_poses(
        self, rotations: np.ndarray, shifts_A: np.ndarray, subset: np.ndarray | None = None
    ) -> "ParticleTable":
        """A copy with new poses (RELION A matrices, origins in A) and halves."""
        n = len(self)
        rotations = np.asarray(rotations, dtype=np.float64).reshape(n, 3, 3)
        shifts_A = np.asarray(shifts_A, dtype=np.float64).reshape(n, 2)
        sub = self.subset if subset is None else np.asarray(subset, dtype=np.int64).reshape(n)
        return replace(self, rotations=rotations, shifts_A=shifts_A, subset=sub)

    def with_scores(self, confidence: np.ndarray, fit_loss: np.ndarray) -> "ParticleTable":
        """A copy with per-particle scores (N,) (see ``confidence`` and ``fit_loss``)."""
        n = len(self)
        return replace(self, confidence=np.asarray(confidence, dtype=np.float64).reshape(n),
                       fit_loss=np.asarray(fit_loss, dtype=np.float64).reshape(n))

    def with_classes(self, classes: np.ndarray) -> "ParticleTable":
        """A copy with the 0-based class (N,) of each particle (see ``classes``)."""
        c = np.asarray(classes).reshape(len(self))
        if len(c) and (c.min() < 0 or not np.issubdtype(c.dtype, np.integer)):
            raise ValueError("classes: expected integers >= 0 (0-based classes)")
        return replace(self, classes=c.astype(np.int64))

    def with_ctf_phase_flipped(self, flipped: bool = True) -> "ParticleTable":
        """A copy whose images are (or are not) phase-flipped (``CTFParams.phase_flipped``); as is without CTF."""
        if self.ctf is None or self.ctf.phase_flipped == bool(flipped):
            return self
        return replace(self, ctf=replace(self.ctf, phase_flipped=bool(flipped)))

    def subset_rows(self, idx: np.ndarray) -> "ParticleTable":
        """A table of the rows ``idx`` (int indices or boolean mask), in that order.

        ``raw`` (STAR DataFrames / cryoSPARC Dataset) and per-particle arrays in
        ``extra`` are subset too, so writers still pass every original column through.
        """
        n = len(self)
        idx = np.asarray(idx)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)

        def take(a):
            return None if a is None else np.asarray(a)[idx]

        raw = self.raw
        if isinstance(raw, dict) and raw.get("particles") is not None:
            raw = {**raw, "particles": raw["particles"].iloc[idx].reset_index(drop=True)}
        elif raw is not None and hasattr(raw, "take") and len(raw) == n:  # cryosparc Dataset
            raw = raw.take(idx)
        extra = {k: (v[idx] if isinstance(v, np.ndarray) and v.shape[:1] == (n,) else v)
                 for k, v in self.extra.items()}
        return replace(
            self,
            stack_paths=take(self.stack_paths),
            stack_indices=take(self.stack_indices),
            apix=take(self.apix),
            ctf=None if self.ctf is None else self.ctf.subset(idx),
            rotations=take(self.rotations),
            shifts_A=take(self.shifts_A),
            subset=take(self.subset),
            optics_group=take(self.optics_group),
            confidence=take(self.confidence),
            fit_loss=take(self.fit_loss),
            classes=take(self.classes),
            raw=raw,
            extra=extra,
        )

    def halves(self, seed: int = 0) -> np.ndarray:
        """(N,) RELION random subsets in {1, 2}: the table's own when they form a
        valid split (only 1/2, both present when N >= 2), else a seeded balanced split."""
        s = self.subset
        if s is not None:
            s = np.asarray(s, dtype=np.int64)
            vals = set(np.unique(s).tolist())
            if vals <= {1, 2} and (len(s) < 2 or vals == {1, 2}):
                return s
        return balanced_halves(len(self), seed)


def balanced_halves(n: int, seed: int = 0) -> np.ndarray:
    """(n,) random subsets 1/2 of sizes ceil(n/2) and floor(n/2), reproducible from ``seed``."""
    out = np.full(n, 2, dtype=np.int64)
    out[np.random.default_rng(seed).permutation(n)[: (n + 1) // 2]] = 1
    return out
