#!/usr/bin/env bash
# Set up (if needed) and run the bundled demo: simulate a small dataset from a
# structure generated in code, run cryoSPIN ab initio, compare with the truth.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cryospin demo --o "${1:-cryospin_demo}"
