#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: RELION 3.1 (test oracle and
# downstream refinement), Open MPI, and the Python package with a CPU torch.
# Idempotent: steps already done are skipped. Set CRYOSPIN_TORCH to pick another
# torch requirement (e.g. CRYOSPIN_TORCH=torch on a CUDA machine).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if ! command -v relion_refine >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing RELION 3.1 and Open MPI from Debian packages"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq relion openmpi-bin poppler-utils >/dev/null
  else
    echo "[setup] apt-get not found: install RELION 3.1 yourself for the RELION tests" >&2
  fi
fi

PY=${PYTHON:-python3}
# The CPU wheel: an unpinned torch would pull gigabytes of CUDA packages.
TORCH_REQ=${CRYOSPIN_TORCH:-torch==2.13.0}
if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_REQ"
  $PY -m pip install -q "$TORCH_REQ"
fi
echo "[setup] installing cryospin-relion and its dependencies"
$PY -m pip install -q -e ".[test]"
