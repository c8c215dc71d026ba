#!/usr/bin/env bash
# The whole GPU check in one call, on a machine with one CUDA GPU and no package registry
# (docs/gpu.md): installs the bundle made by scripts/gpu_bundle.sh, prints the GPU and versions, then runs
# the steps of scripts/gpu/check.py in order of value, each with its own time bound, each recorded in
# OUT/summary.json as it finishes. Run it again with the same OUT (or a copy of its summary.json) and the
# steps that passed are skipped.
#
#   bash scripts/gpu_check.sh OUT [check.py options]          on the GPU machine (python3 with CUDA torch)
#   bash scripts/gpu_check.sh --rehearse OUT [options]        the same steps, tiny, on CPU (CI)
#
# Environment: DISTILLERY_GPU_BUNDLE (default .gpu; rehearsal: .gpu-rehearse), DISTILLERY_GPU_SITE (where
# the wheels are installed, default /tmp/distillery-site), PYTHON (default python3; rehearsal .venv/bin/python).
# The project runs from this source tree on PYTHONPATH (it is not installed there): the GPU image's Python
# is 3.12, and pyproject.toml's requires-python stays what the CPU setup tests (3.11).
set -euo pipefail
cd "$(dirname "$0")/.."

rehearse=()
if [ "${1:-}" = --rehearse ]; then
  rehearse=(--rehearse)
  shift
fi
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_check.sh [--rehearse] OUT [options]" >&2; exit 2; }
out=$1
shift
mkdir -p "$out"

if [ ${#rehearse[@]} -eq 1 ]; then
  bundle=${DISTILLERY_GPU_BUNDLE:-.gpu-rehearse}
  python=${PYTHON:-.venv/bin/python}
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  bundle=${DISTILLERY_GPU_BUNDLE:-.gpu}
  python=${PYTHON:-python3}
  site=${DISTILLERY_GPU_SITE:-/tmp/distillery-site}
  [ -d "$bundle/wheels" ] || { echo "gpu_check: no wheels in $bundle (run scripts/gpu_bundle.sh here first)" >&2; exit 1; }
  started=$(date +%s)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$bundle"/wheels/*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
  echo "gpu_check: installed $(ls "$bundle"/wheels | wc -l) wheels into $site in $(($(date +%s) - started)) s" >&2
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$python" scripts/gpu/check.py "$out" --bundle "$bundle" "${rehearse[@]}" "$@"
