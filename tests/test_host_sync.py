"""No host read per batch (#10, GPU): the training loops queue work on the device and never wait for it.

On CUDA, reading a value (``.item()``, ``float()``, ``bool()``), an op whose output size depends on the
data (``nonzero``, boolean-mask indexing, ``bincount``, ``unique``) makes the host wait for the GPU. The CPU
cannot show the waits, but it shows the ops: a ``TorchDispatchMode`` sees every aten op, and the Python stack
says which line of this package called it. A read per batch is one that runs three times as often when the
batches are three times smaller; this test runs the same schedule at two batch sizes and asserts that no line
of the package reads more often at the smaller one.
"""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cryospin_relion.config import AbinitConfig
from cryospin_relion.engine.distributed import ALONE
from cryospin_relion.engine.forward import frequency_mask
from cryospin_relion.engine.history import WINNER_SOURCES
from cryospin_relion.engine.run import AbinitEngine
from cryospin_relion.engine.tally import PendingSums, value_counts
from cryospin_relion.evaluate.blobs import simulate_blobs
from cryospin_relion.geometry.ctf import CTF

# ops that make CUDA wait for the host to learn a value or a size
READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
         "bincount", "repeat_interleave", "equal", "is_nonzero"}


# tensor methods that copy to the host: on the CPU they are no-ops that no dispatch mode sees, so they are
# counted by wrapping them (a call on a tensor that is on the host anyway counts too: the package does not
# make such calls in its loops, so that a count means a copy on CUDA)
COPIES = ("cpu", "tolist", "numpy", "item")


class HostReads(TorchDispatchMode):
    """Counts the reads (``READS``, indexing by a boolean mask, ``COPIES``) that a line of the package calls
    itself (the innermost Python frame is the package's: e.g. Adam's read of its CPU step count is torch's)."""

    def __init__(self):
        super().__init__()
        self.lines: Counter[str] = Counter()
        self._saved: dict = {}

    def _count(self) -> None:
        frame = next(f for f in reversed(traceback.extract_stack()[:-2]) if not _dispatch_frame(f.filename))
        if "cryospin_relion" in frame.filename:
            self.lines[f"{frame.filename.split('cryospin_relion')[-1]}:{frame.lineno} {frame.line}"] += 1

    def __enter__(self):
        for name in COPIES:
            orig = self._saved[name] = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                self._count()
                return _orig(t, *a, **k)
            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        read = name in READS
        if name in ("index", "index_put", "index_put_"):
            read = any(i is not None and i.dtype == torch.bool for i in args[1])
        if read:
            self._count()
        return func(*args, **(kwargs or {}))


def _dispatch_frame(filename: str) -> bool:
    """torch's own frames between a caller and ``__torch_dispatch__`` (its dynamo-disable wrappers)."""
    f = filename.replace("\\", "/")
    return any(p in f for p in ("torch/_compile.py", "torch/_dynamo/", "torch/utils/_python_dispatch.py"))


@pytest.fixture(scope="module")
def tiny():
    return simulate_blobs(n=16, N=192, apix=6.0, snr=2.0, max_shift_px=1.0, seed=3)


def _reads(tiny, batch_size: int, **kw) -> Counter[str]:
    cfg = AbinitConfig.from_dict(dict(heads=2, epochs_amortized=2, min_epochs_amortized=2, epochs_autodecode=2,
                                      batch_size=batch_size, pose_iters=2, seed=5, stage1_particles=96) | kw)
    eng = AbinitEngine(tiny["images"], tiny["apix"], CTF.from_arrays(tiny["ctf"]), cfg, "cpu")
    frequency_mask.cache_clear()  # made once per Fourier box: the same count in both runs
    with HostReads() as mode:
        assert eng.run() == "done"
    return mode.lines


@pytest.mark.parametrize("kw", [{}, {"first_pose": "heads", "stage1_trials": 1}],
                         ids=["default (3 starts, search first poses)", "heads first poses"])
def test_no_line_reads_the_device_once_per_batch(tiny, kw):
    """Stage 1 (pose search included), the first-pose pass and stage 2 at 12 and 4 batches per epoch: every
    package line that reads does so as often in both (per epoch or per pass, not per batch)."""
    few, many = _reads(tiny, 48, **kw), _reads(tiny, 16, **kw)
    per_batch = {line: (many[line], few[line]) for line in many if many[line] > few[line]}
    assert not per_batch, per_batch
    assert any("engine/tally.py" in line for line in many)  # the epochs' sums are read (so the count works)


def test_value_counts_is_bincount():
    x = torch.tensor([[3, 0, 3], [1, 3, 3]])
    assert value_counts(x, 5).tolist() == torch.bincount(x.reshape(-1), minlength=5).double().tolist()
    assert value_counts(torch.zeros(0, dtype=torch.long), 2).tolist() == [0.0, 0.0]


def test_pending_sums_drain_what_was_added_since_the_last_drain():
    p = PendingSums(heads=2, device="cpu")
    assert p.peek_loss() is None
    p.add(torch.tensor(0.5), 4, torch.tensor([0, 1, 1, 1]), torch.tensor([3, 3, 0, 2]))
    p.add(torch.tensor(0.25), 2)  # a stage-2 batch: no wins, no sources
    assert p.peek_loss() == pytest.approx((0.5 * 4 + 0.25 * 2) / 6)
    loss_sum, wins, sources, ranks = p.drain(ALONE)
    assert loss_sum == pytest.approx(2.5) and wins == [1, 3] and ranks == [6]
    assert sources == [1, 0, 1, 2] and len(sources) == len(WINNER_SOURCES)
    p.add(torch.tensor(1.0), 3, torch.tensor([0, 0, 0]))
    assert p.drain(ALONE) == (pytest.approx(3.0), [3, 0], [0, 0, 0, 0], [3])
    assert p.peek_loss() == pytest.approx(5.5 / 9)  # the epoch so far, drained or not
    p.reset()
    assert p.peek_loss() is None and p.drain(ALONE)[3] == [0]


def test_the_scores_pass_reads_once_not_per_chunk(tiny):
    """``score_particles`` (after training) at chunks of 48 and 16 images: no line reads more often."""
    from cryospin_relion.engine.particles import ParticleImages
    from cryospin_relion.engine.scores import ScoreSettings, score_particles
    from cryospin_relion.model.volume import HartleyVolume

    data = ParticleImages(tiny["images"], tiny["apix"], CTF.from_arrays(tiny["ctf"]), "cpu")
    vol = HartleyVolume(16)
    counts = []
    for chunk in (48, 16):
        frequency_mask.cache_clear()
        with HostReads() as mode:
            ps = score_particles(vol, data, tiny["R"], tiny["t"], ScoreSettings(chunk=chunk, grid_size=64))
        counts.append(mode.lines)
        assert ps.loss.shape == (192,) and ps.loss.device.type == "cpu"
    few, many = counts
    assert not {line for line in many if many[line] > few[line]}, many
