"""Evaluation tools: simulated datasets, map alignment with the hand, pose errors.

- ``simulate``: maps / atomic models -> RELION particles with CTF, shifts, noise
- ``synthetic``: a protein-like, chiral test structure made in code
- ``blobs``: in-memory blob-map datasets and a backprojection FSC, for engine tests and benches
- ``align``: ``transform_volume``, ``align_maps`` (map alignment, mirror included)
- ``pose_error``: pose errors up to one global rotation and the hand
(the hand flip itself is ``geometry.hand``).
"""

from cryospin_relion.evaluate.align import align_maps, transform_volume

__all__ = ["align_maps", "transform_volume"]
