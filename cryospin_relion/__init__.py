"""cryoSPIN ab-initio reconstruction for RELION and cryoSPARC.

Architecture: ``io/`` adapters at the edges (STAR, .cs, MRC), ``geometry/`` pure
torch functions (rotations, CTF, Fourier slicing, backprojection, FSC), ``data/``
the cached working-box stack, ``model/`` + ``engine/`` the cryoSPIN method,
``commands/`` one module per ``cryospin`` subcommand.
"""

__version__ = "0.1.0"
