"""Local multi-process launch: torchrun --standalone running `python -m launcher SUBCOMMAND ...`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from distill.errors import UserError


def launch_local(nproc: int, command: Sequence[str]) -> int:
    """Run `distillery <command>` on `nproc` ranks; returns the exit code (2 if any rank failed on user input)."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if not command:
        raise UserError(
            "launch needs a subcommand after --, e.g. distillery launch --nproc 2 -- train CONFIG"
        )
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    argv += ["-m", "launcher", *command]
    threads = max(1, (os.cpu_count() or 1) // nproc)  # share the cores instead of oversubscribing them
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    result = subprocess.run(argv, env=env)
    return result.returncode
