#!/usr/bin/env bash
# Make, on this machine, everything a GPU machine without a package registry needs to run
# scripts/gpu_check.sh: one ignored folder that travels with the working tree (docs/gpu.md).
#
#   bash scripts/gpu_bundle.sh [--wheels-only | --rehearse] [BUNDLE_DIR]      (default BUNDLE_DIR: .gpu)
#
# BUNDLE_DIR/wheels: the packages the GPU image lacks, for CPython 3.12 on manylinux x86_64, at the
#   versions this checkout's .venv tests (read from it, not guessed): megatron-core and pydantic-core
#   as binary wheels from the registry; pydantic, omegaconf and their pure-Python needs as they are;
#   deepspeed built here without prebuilt ops (its registry release is a source archive; the GPU run
#   JIT-builds an op only if one is used) and antlr4-python3-runtime 4.9 (omegaconf's parser, a
#   source release only). Left out: what the GPU run never imports (datasets: hub sources only;
#   wandb: off unless logging.wandb is set; lm-eval: the eval stage writes its task files without it)
#   and what the image has (torch, transformers, accelerate, numpy, safetensors, tokenizers, ...).
# BUNDLE_DIR/demo: the default campaign's prepared data and the CPU float32 run's reference numbers
#   (metrics, held-out bits per byte), from runs/demo (`distillery run configs/demo.yaml` first if that
#   is not complete): the GPU machine's files differ from this one's, so a corpus built there would too.
#
# --wheels-only: the wheels and their checks only. --rehearse: no wheels; BUNDLE_DIR/demo from a
# shrunk demo campaign run here (what `scripts/gpu_check.sh --rehearse` compares against, in CI).
# Fails if a wheel is not for Python 3.12 (or pure Python) or the bundle exceeds 50 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
  --wheels-only) mode=wheels; shift ;;
  --rehearse) mode=rehearse; shift ;;
  -*) echo "gpu_bundle: unknown option $1 (--wheels-only | --rehearse)" >&2; exit 2 ;;
esac
bundle=${1:-.gpu}
venv_python=${PYTHON:-.venv/bin/python}
[ -x "$venv_python" ] || { echo "gpu_bundle: $venv_python is missing; run scripts/setup.sh first" >&2; exit 1; }
mkdir -p "$bundle"

version_of() { "$venv_python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

if [ "$mode" != rehearse ]; then
  wheels="$bundle/wheels"
  rm -rf "$wheels" && mkdir -p "$wheels"
  pip=("$venv_python" -m pip --disable-pip-version-check -q)
  target=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  download=()
  for name in megatron-core pydantic pydantic-core annotated-types typing-inspection typing-extensions \
    omegaconf hjson; do
    download+=("$name==$(version_of "$name")")
  done
  echo "gpu_bundle: downloading ${download[*]}" >&2
  "${pip[@]}" download "${target[@]}" -d "$wheels" "${download[@]}"
  # pure-Python wheels built here; DS_ACCELERATOR=cuda is what deepspeed records as its accelerator
  built=("deepspeed==$(version_of deepspeed)" "antlr4-python3-runtime==$(version_of antlr4-python3-runtime)")
  echo "gpu_bundle: building ${built[*]}" >&2
  DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "${pip[@]}" wheel --no-cache-dir --no-deps --no-build-isolation \
    -w "$wheels" "${built[@]}"
fi

if [ "$mode" != wheels ]; then
  "$venv_python" scripts/gpu/bundle_demo.py "$bundle/demo" --mode "$mode"
fi

# the commit the bundle was made from (and whether the tree had changes), for the check's summary
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain 2>/dev/null)" ] || commit="$commit (with uncommitted changes)"
echo "$commit" >"$bundle/commit.txt"

"$venv_python" scripts/gpu/bundle_check.py "$bundle"
