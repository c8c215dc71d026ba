#!/usr/bin/env bash
# Create .venv and install distillery with its dev extras, plus the few Debian packages it uses.
# Idempotent: a second run takes seconds.
#  - torch goes in first, pinned, so that nothing later resolves it to a multi-GB CUDA build;
#  - deepspeed ships only as an sdist whose setup.py imports torch: it builds without isolation;
#  - groff renders the man pages of the demo corpus (docs, multilingual domains);
#  - Slurm and munge run the private test cluster of scripts/slurm_cluster.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "setup: please install the Debian packages: $*" >&2
    return 1
  fi
}

command -v groff >/dev/null || apt_install groff-base
command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ] || apt_install slurmctld slurmd slurm-client munge

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  echo "setup: distillery needs Python 3.11 (megatron-core 0.16.1); found $("$PY" --version)" >&2
  exit 1
}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv 2>/dev/null || { apt_install python3.11-venv && "$PY" -m venv .venv; }
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
pip install --upgrade "pip>=24" "setuptools>=68" wheel
pip install "torch==2.13.0"
.venv/bin/python -c "import deepspeed" 2>/dev/null ||
  DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==0.19.8"
pip install -e ".[dev]"
.venv/bin/python -c "import torch, megatron.core, deepspeed, transformers, datasets, wandb" 2>/dev/null ||
  { echo "setup: the installed packages do not import" >&2; exit 1; }
