"""cryoSPIN ab-initio reconstruction for RELION and cryoSPARC.

Architecture: ``io/`` adapters at the edges (STAR, .cs, MRC), ``geometry/`` pure
torch functions (rotations, CTF, Fourier slicing, backprojection, FSC), ``data/``
the cached working-box stack, ``model/`` + ``engine/`` the cryoSPIN method,
``commands/`` one module per ``cryospin`` subcommand.
"""

__version__ = "0.1.0"

# the paper to cite, printed at the start of run.log and by ``cryospin --version`` (docs/method.md)
CITATION = ("Shekarforoush, Lindell, Brubaker, Fleet, \"Improving Ab-Initio Cryo-EM Reconstruction with "
            "Semi-Amortized Pose Inference\", NeurIPS 2024")
