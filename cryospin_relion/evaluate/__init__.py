"""Evaluation tools: simulated datasets, map alignment with the hand, pose errors.

- ``simulate``: maps / atomic models -> RELION particles with CTF, shifts, noise
- ``synthetic``: a protein-like, chiral test structure made in code
- ``align``: ``flip_volume_hand``, ``flip_poses_hand``, ``transform_volume``, ``align_maps``
- ``pose_error``: pose errors up to one global rotation and the hand
"""

from cryospin_relion.evaluate.align import align_maps, flip_poses_hand, flip_volume_hand, transform_volume

__all__ = ["align_maps", "flip_poses_hand", "flip_volume_hand", "transform_volume"]
