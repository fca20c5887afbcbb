#!/usr/bin/env bash
# Quick start, command 1: install everything, then run the demo fine-tune (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec phi3v-tune demo "$@"
