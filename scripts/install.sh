#!/usr/bin/env bash
# Installs phi3v-tune and everything it needs into ./.venv (created if missing). Safe to run repeatedly.
# torch is installed first as the CPU build (torch==2.13.0) when no torch is present, so that pip never pulls a
# multi-GB CUDA build just to satisfy the `torch` requirement. On a GPU machine, install your CUDA torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[install] torch (CPU build 2.13.0)"
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
if ! python -c "import phi3v_tune, pytest, hypothesis" >/dev/null 2>&1 || [ "${PHI3V_REINSTALL:-0}" = 1 ] \
   || [ pyproject.toml -nt .venv/.phi3v_installed ]; then
  echo "[install] phi3v-tune and dependencies"
  python -m pip install -q -e ".[dev]"
  touch .venv/.phi3v_installed
fi
