#!/usr/bin/env bash
# Quick start, command 2: install everything, then run the CPU test suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec python -m pytest tests "$@"
