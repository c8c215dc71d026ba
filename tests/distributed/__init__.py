"""Tests on real gloo processes. `run_ranks(script, nproc, ...)` starts `torchrun --standalone` on a
rank-side script of tests/distributed/ranks/ and returns what each rank reported (JSON written with
`report`); other tests here start `distillery launch --nproc N`.

Importing megatron-core costs seconds per process and the machine has 2 cores, so each script checks
many things (layouts, models) in one launch; tests then assert on the reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import REPO


def run_ranks(script: str, nproc: int, out_dir: Path, *args: str, timeout: int = 600) -> list[dict[str, Any]]:
    """Run tests/distributed/ranks/<script> on `nproc` gloo processes; returns each rank's report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(REPO / "tests" / "distributed" / "ranks" / script),
        str(out_dir),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{script} failed (exit {result.returncode}):\n{result.stderr[-6000:]}")
    return [json.loads((out_dir / f"rank_{r}.json").read_text()) for r in range(nproc)]


def report(out_dir: str | Path, rank: int, data: dict[str, Any]) -> None:
    """Called by a rank at the end of a distributed script."""
    Path(out_dir, f"rank_{rank}.json").write_text(json.dumps(data, indent=1))
