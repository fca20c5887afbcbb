#!/usr/bin/env bash
# On the lent GPU machine (Python 3.12, torch/transformers/peft/accelerate present): install the carried wheels
# (.whl/: bitsandbytes, deepspeed sdist and its needs, pytest) into /tmp/site and put it and src/ on PYTHONPATH.
# Usage: source benchmarks/device_setup.sh
W=${WHEELS:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$W"/setuptools-*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$W"/bitsandbytes-*.whl "$W"/hjson-*.whl "$W"/py_cpuinfo-*.whl "$W"/msgpack-*.whl "$W"/ninja-*.whl \
  "$W"/einops-*.whl "$W"/pytest-*.whl "$W"/pluggy-*.whl "$W"/iniconfig-*.whl
python3 -c "import pydantic, sys; sys.exit(0 if pydantic.VERSION.startswith('2') else 1)" 2>/dev/null || \
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$W"/pydantic-2*.whl "$W"/pydantic_core-*.whl \
  "$W"/annotated_types-*.whl "$W"/typing_inspection-*.whl
PYTHONPATH=/tmp/site DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-build-isolation --no-deps \
  --target /tmp/site "$W"/deepspeed-*.tar.gz
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
