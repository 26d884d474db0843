"""Per-particle scores after a run (engine/scores.py) and the numbers the summary and the report show.

The scores use the learned volume and the final poses before any hand flip (a mirrored
map with mirrored poses gives the same images, so the scores do not depend on the hand).
They are written with the poses: particles.star ``rlnMaxValueProbDistribution`` (confidence)
and ``rlnCryospinLoss``; particles.cs ``cryospin/confidence`` and ``alignments3D/error``
(``io.particles.SCORE_COLUMNS``). ``cryospin select`` keeps the rows above a cut-off.

Suggested cut-off (``suggest_cutoff``): Otsu's threshold of the confidence histogram
(the split into two groups with the largest between-group variance). Why: junk
images pile up near 0 and well-aligned ones spread toward 1; Otsu's split needs no
assumption on the shape of either group and has no parameter to tune. It is a
suggestion: the histogram in logfile.pdf shows where it falls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from cryospin_relion.engine.scores import PoseScores, ScoreSettings, confidence_from_gap, score_particles


@dataclass
class ParticleScores:
    """Scores of the N particles of a run, in the table's row order."""

    confidence: np.ndarray  # (N,) float64 in [0, 1]
    loss: np.ndarray  # (N,) float64, the run's loss at the final pose
    gap_noise_units: np.ndarray  # (N,) float64, (best far loss - final loss) / noise unit
    cutoff: float  # suggested minimum confidence (suggest_cutoff)
    seconds: float  # wall time of the scoring

    def summary(self) -> dict:
        """The summary JSON entries: median confidence, suggested cut-off, fraction at or above it."""
        return {"score_median_confidence": float(np.median(self.confidence)),
                "score_suggested_cutoff": float(self.cutoff),
                "score_fraction_above_cutoff": float(np.mean(self.confidence >= self.cutoff)),
                "score_s": float(self.seconds)}


def suggest_cutoff(values: np.ndarray, bins: int = 100) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (``bins`` bins): the bin edge that maximises the
    between-group variance w0 w1 (m0 - m1)^2; 0.5 when the values are all equal."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    if v.size == 0 or np.ptp(v) == 0:
        return 0.5
    h, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    p = h / h.sum()
    mid = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)[:-1]  # group 0 = bins 0..i, threshold at edges[i + 1]
    m = np.cumsum(p * mid)[:-1]
    mt = float((p * mid).sum())
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((w0 > 0) & (w1 > 0), (mt * w0 - m) ** 2 / (w0 * w1), -1.0)
    return float(edges[int(np.argmax(between)) + 1])


def compute_scores(engine, log: logging.Logger, settings: ScoreSettings | None = None) -> ParticleScores | None:
    """Scores of every particle of a finished ``engine`` (its ``volume``, ``final_poses()``, ``data``);
    None (logged) when they fail: the scores must never fail a run whose maps are done.

    Data parallel (``engine.world``): every rank calls this, scores its share of the particles, and the
    shares are summed (every rank gets all scores; whether they failed is decided together)."""
    t0 = time.perf_counter()
    s = settings or ScoreSettings()
    bar, world = engine.progress, engine.world
    mine = None if world.alone else world.share(engine.data.N)
    ps: PoseScores | None = None
    try:
        R, t = engine.final_poses()
        n = engine.data.N if mine is None else len(mine)
        bar.start(f"particle scores, {n} particles", -(-n // s.chunk), 0)
        try:
            tick = lambda done, total: bar.update(None, None)  # noqa: E731
            if engine.K == 1:
                ps = score_particles(engine.volume, engine.data, R, t, s, engine.cfg.model.loss,
                                     engine.cfg.model.mask_radius, tick, rows=mine)
            else:  # each particle against its own class's volume; the other rows are 0, so the parts sum
                cls = torch.from_numpy(engine.final_classes())
                todo = torch.arange(engine.data.N) if mine is None else torch.as_tensor(mine)
                parts = [score_particles(engine.class_volume(k), engine.data, R, t, s, engine.cfg.model.loss,
                                         engine.cfg.model.mask_radius, tick, rows=todo[cls[todo] == k])
                         for k in range(engine.K)]
                loss, gap, noise = (sum(getattr(p, f) for p in parts) for f in ("loss", "gap", "noise"))
                ps = PoseScores(confidence_from_gap(gap, noise, s.scale), loss, gap, noise)
        finally:
            bar.close()
    except Exception as e:  # noqa: BLE001 - logged; the run's other outputs go on
        log.info(f"particle scores not computed: {type(e).__name__}: {e}")
    if world.any(ps is None)[0]:  # a rank failed: no scores anywhere (and no rank left in a collective)
        return None
    if not world.alone:  # the shares are zero elsewhere: summing gives every row from its rank
        for v in (ps.loss, ps.gap, ps.noise):
            world.sum_(v)
        ps = PoseScores(confidence_from_gap(ps.gap, ps.noise, s.scale), ps.loss, ps.gap, ps.noise)
    conf = ps.confidence.double().numpy()
    out = ParticleScores(conf, ps.loss.double().numpy(), (ps.gap / ps.noise).double().numpy(),
                         suggest_cutoff(conf), time.perf_counter() - t0)
    sm = out.summary()
    log.info(f"particle scores ({out.seconds:.1f} s): median confidence {sm['score_median_confidence']:.2f}; "
             f"suggested cut-off {out.cutoff:.2f} (Otsu) keeps {100 * sm['score_fraction_above_cutoff']:.0f}% "
             f"(cryospin select --min-score)")
    return out
