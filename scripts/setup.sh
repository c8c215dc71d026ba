#!/usr/bin/env bash
# Create .venv and install distillery with its dev extras. Idempotent: a second run is fast.
# torch goes in first, pinned, so that nothing later resolves it to a CUDA build; deepspeed
# ships only as an sdist whose setup.py imports torch, so it builds without isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=24" "setuptools>=68" wheel
pip install "torch==2.13.0"
.venv/bin/python -c "import deepspeed" 2>/dev/null || \
  DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==0.19.8"
pip install -e ".[dev]"
