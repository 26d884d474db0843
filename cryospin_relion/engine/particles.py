"""The particles as the engine sees them: working-box images on the host, pixel sizes and CTFs on the device.

Images stay where the caller keeps them (a numpy memory map of the cached
working stack, or a tensor); a batch is read in sorted row order (sequential on
disk) and moved to the device. ``batch`` prepares the forward model's inputs
(engine/forward.py). ``prefetch`` reads the next batches' images in a background
thread while the current one computes (memory maps of a million images do not fit
in memory; reading then overlaps compute instead of adding to it).

Per-particle state here, on the device: pixel size and CTF (at most 9 float32 + 1 bool = 41 bytes;
values that are equal for all particles, such as voltage or Cs, are stored once).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from cryospin_relion.engine.forward import Batch, ctf_cropped, prepare_batch
from cryospin_relion.geometry.ctf import CTF
from cryospin_relion.geometry.fourier import fourier_crop_2d, ht2_centered
from cryospin_relion.model.volume import radial_profile_2d


def _shared_if_constant(v: Tensor) -> Tensor:
    """(N,) per-particle values; one stored value expanded to (N,) (stride 0) when all are equal.

    Why: voltage, Cs, amplitude contrast, pixel size (and often phase shift, B-factor, scale) are per
    optics group, mostly one value for all particles: 4 bytes each per particle saved at a million
    particles, and indexing gives the same (B,) values."""
    if v.ndim == 1 and v.shape[0] > 1 and bool((v == v[0]).all()):
        return v[:1].clone().expand(v.shape[0])  # clone: not a view that keeps the (N,) storage alive
    return v.contiguous()


class RowView:
    """Rows ``rows`` (sorted, CPU) of an (N, n, n) image array or tensor, read only when indexed: the images of
    one class for its re-formation (run.py ``_reform_classes``) without a copy of them."""

    def __init__(self, images, rows: Tensor):
        self.images, self.rows = images, rows.cpu().numpy()
        self.shape = (len(self.rows), *images.shape[1:])

    def __getitem__(self, i):
        return self.images[self.rows[i]]


def on_host(idx: Tensor) -> Tensor:
    """``idx`` on the CPU. The batches' row indices are made there, so this copies only what a caller made on
    the device (a copy from CUDA waits for it)."""
    return idx if idx.device.type == "cpu" else idx.cpu()


class ParticleImages:
    """Images (N, n, n) (host), pixel sizes (N,) and CTFs (or None) on ``device``."""

    def __init__(self, images, apix_work, ctf: CTF | None, device: torch.device):
        self.images = images
        self.N, self.box = int(images.shape[0]), int(images.shape[-1])
        if self.box % 2:
            raise ValueError("the working box must be even")
        self.device = torch.device(device)
        ap = torch.as_tensor(apix_work, dtype=torch.float32)
        self.apix = _shared_if_constant((ap.expand(self.N) if ap.ndim == 0 else ap).to(self.device))
        self.ctf = None if ctf is None else ctf.to(self.device, torch.float32).map(_shared_if_constant)

    def __len__(self) -> int:
        return self.N

    def read(self, idx: Tensor, pin: bool = False) -> Tensor:
        """Images (B, n, n) float32 on the host, in the order of ``idx`` (a CPU index tensor); ``pin``: in
        pinned memory when the device is CUDA (so that the copy to it can be asynchronous)."""
        if isinstance(self.images, Tensor):
            x = self.images[idx].to(torch.float32)
        else:
            ii = idx.numpy()
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(self.images[np.sort(ii)]), dtype=np.float32))
            x = x[torch.from_numpy(np.argsort(np.argsort(ii)))]  # back to idx order
        return x.pin_memory() if pin and self.device.type == "cuda" and x.device.type == "cpu" else x

    def load(self, idx: Tensor) -> Tensor:
        """Images (B, n, n) float32 on the device, in the order of ``idx`` (a CPU index tensor)."""
        return self.read(idx).to(device=self.device, dtype=torch.float32)

    def prefetch(self, batches: Sequence[Tensor], depth: int = 2) -> "Prefetcher":
        """The images of each index tensor of ``batches``, in order, read ahead in a background thread
        (``Prefetcher``): equal to ``load(idx)`` for each ``idx``. Use as a context manager, so that an
        early exit stops the thread::

            with data.prefetch(batches) as ready:
                for idx, images in zip(batches, ready):
                    b = data.batch(idx, crop, mask_radius, encoder_box, images=images)
        """
        return Prefetcher(self, batches, depth)

    def batch(self, idx: Tensor, crop: int, mask_radius: float, encoder_box: int | None = None,
              images: Tensor | None = None) -> Batch:
        """The forward model's batch at Fourier box ``crop``; ``encoder_box``: the encoder's input images are
        Fourier-cropped to it (None = the working box). ``images``: the batch's images already on the device
        (from ``prefetch``); None reads them now."""
        images = self.load(on_host(idx)) if images is None else images
        idx = idx.to(self.device, non_blocking=True)  # a blocking copy to CUDA waits for the GPU
        ctf = None if self.ctf is None else self.ctf[idx]
        b = prepare_batch(idx, images, self.apix[idx], ctf, crop, mask_radius)
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


class Prefetcher:
    """Iterator over the device images of a list of index tensors, read ``depth`` batches ahead.

    A background thread reads each batch from the host images (``ParticleImages.read``: sorted rows of the
    memory map, pinned memory on CUDA) and, on CUDA, copies it to the device on its own stream
    (non-blocking) and waits for that copy, so a batch handed out is complete; the main thread's compute
    (torch releases the GIL) runs meanwhile. The result equals ``ParticleImages.load``, in the order given.
    An error in the thread is raised by ``next``. ``close`` (or leaving the ``with`` block) stops the thread.
    """

    _DONE = object()

    def __init__(self, data: ParticleImages, batches: Sequence[Tensor], depth: int = 2):
        self.data, self.batches = data, list(batches)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._cuda = data.device.type == "cuda"
        self._thread = threading.Thread(target=self._work, name="cryospin-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            stream = torch.cuda.Stream(self.data.device) if self._cuda else None
            for idx in self.batches:
                if self._stop.is_set():
                    return
                x = self.data.read(on_host(idx), pin=stream is not None)
                if stream is not None:
                    with torch.cuda.stream(stream):
                        x = x.to(self.data.device, non_blocking=True)
                    stream.synchronize()  # handed out complete: the consumer needs no stream sync
                else:
                    x = x.to(self.data.device)
                if not self._put(x):
                    return
        except BaseException as e:  # handed to the consumer, raised by next()
            self._put(e)
            return
        self._put(self._DONE)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Tensor:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is self._DONE:
            self._stop.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        if self._cuda:  # allocated on the copy stream, used on the consumer's
            item.record_stream(torch.cuda.current_stream(self.data.device))
        return item

    def close(self) -> None:
        """Stop the thread (pending batches are dropped)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
