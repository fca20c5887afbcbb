#!/usr/bin/env bash
# On the lent GPU machine (Python 3.12, torch/transformers/peft/accelerate present): install the carried wheels
# (.whl/: e.g. bitsandbytes, torchao, and DeepSpeed's sdist with its needs when carried) into /tmp/site and put it and
# the sources (PHI3V_SRC, default src/) on PYTHONPATH.
# Usage: source benchmarks/device_setup.sh
W=${WHEELS:-.whl}
shopt -s nullglob
wheels=("$W"/*.whl)
[ ${#wheels[@]} -gt 0 ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${wheels[@]}"
for sdist in "$W"/deepspeed-*.tar.gz; do
  PYTHONPATH=/tmp/site DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-build-isolation --no-deps \
    --target /tmp/site "$sdist"
done
shopt -u nullglob
export PYTHONPATH=/tmp/site:$PWD/${PHI3V_SRC:-src} PYTHONUNBUFFERED=1
