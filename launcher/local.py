"""Local multi-process launch: torch's elastic agent (what torchrun runs) starting `python -m launcher ...`.

The agent runs in this process instead of a `torchrun` child so that a failed rank ends in our words,
not in torchrun's `ChildFailedError` traceback. Each rank reports how it ended into a directory named by
`RANK_REPORTS` (see `launcher.cli`): a rank that stopped on user input (exit code 2) leaves its
one-paragraph message, a rank that crashed leaves its traceback. When the job fails:

- some rank stopped on user input: its message is raised once as `LaunchFailed(2)` (identical messages
  of several ranks are merged and the ranks named); the other ranks' ends are consequences (killed by
  the agent, or a collective broken by the missing peer) and are not shown;
- every rank that reported stopped on a stop request (`distill/stop.py`) and none crashed:
  `LaunchFailed(EXIT_STOPPED)`, which a Slurm batch script reads as "requeue me";
- otherwise every crashed rank's traceback is printed under its rank, and `LaunchFailed(1)` names the
  ranks, their exit codes or the signal that killed them.

Several nodes (`nnodes` > 1, one agent per node, e.g. one Slurm task per node): the agents meet in a
c10d rendezvous at `rdzv_endpoint` (host:port of the first node, reachable from the others) under
`rdzv_id` (the job id), and torch numbers the ranks across the nodes. Under a stop file
(`DISTILLERY_STOP_FILE`, set by the batch script) SIGTERM to the agent is relayed through that file
instead of torch's default of terminating the workers, so the ranks finish their step and checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.errors import UserError
from distill.messages import say
from distill.stop import EXIT_STOPPED, STOP_FILE

RANK_REPORTS = "DISTILLERY_RANK_REPORTS"  # env: where launched ranks write how they ended
AGENT_PID = "DISTILLERY_AGENT_PID"  # env: the launching process, which a rank must not outlive


class LaunchFailed(Exception):
    """A launched job failed; `code` is the exit code the command should end with (2: user input)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def launch_local(
    nproc: int,
    command: Sequence[str],
    *,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> None:
    """Run `distillery <command>` on `nproc` ranks of this machine (times `nnodes` machines, each
    running this call); raises `LaunchFailed` if any failed."""
    if nnodes > 1 and not rdzv_endpoint:
        raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node's address)")
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if not command:
        raise UserError(
            "launch needs a subcommand after --, e.g. distillery launch --nproc 2 -- train CONFIG"
        )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    reports = Path(tempfile.mkdtemp(prefix="distillery-ranks-"))
    threads = max(1, (os.cpu_count() or 1) // nproc)  # share the cores instead of oversubscribing them
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ[RANK_REPORTS] = str(reports)
    os.environ[AGENT_PID] = str(os.getpid())
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=rdzv_id or f"distillery-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=rdzv_endpoint or "localhost:0",  # alone: torchrun --standalone, a free local port
        max_restarts=0,
    )
    relay = _relay_sigterm_to_stop_file()
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)  # its failure log repeats what we report below
    try:
        elastic_launch(config, sys.executable)("-m", "launcher", *command)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        raise _failure(reports, codes) from None
    finally:
        agent_log.setLevel(level)
        os.environ.pop(RANK_REPORTS, None)
        os.environ.pop(AGENT_PID, None)
        if relay is not None:
            signal.signal(signal.SIGTERM, relay)
            os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        shutil.rmtree(reports, ignore_errors=True)


def _relay_sigterm_to_stop_file() -> Any:
    """Under a stop file, SIGTERM to the agent writes it (every rank of every node then stops at its
    next step and checkpoints) instead of torch's handler, which would terminate the workers at once.
    Returns the previous handler, or None when there is no stop file."""
    path = os.environ.get(STOP_FILE)
    if not path:
        return None

    def request_stop(signum: int, frame: Any) -> None:
        Path(path).touch()

    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    return signal.signal(signal.SIGTERM, request_stop)


def _failure(reports: Path, codes: dict[int, int]) -> LaunchFailed:
    """What to tell the user about a failed job, from the ranks' reports and exit codes."""
    user = {int(p.stem.split("_")[1]): p.read_text() for p in reports.glob("rank_*.user")}
    stopped = {int(p.stem.split("_")[1]): p.read_text() for p in reports.glob("rank_*.stopped")}
    if stopped and not user and not list(reports.glob("rank_*.crash")):
        return LaunchFailed(next(iter(stopped.values())), EXIT_STOPPED)
    if user:
        ranks_by_message: dict[str, list[int]] = {}
        for rank, message in sorted(user.items()):
            ranks_by_message.setdefault(message, []).append(rank)
        if len(ranks_by_message) == 1:
            return LaunchFailed(next(iter(ranks_by_message)), 2)
        parts = [f"{_ranks(ranks)}: {message}" for message, ranks in ranks_by_message.items()]
        return LaunchFailed("ranks stopped on different errors:\n" + "\n".join(parts), 2)
    crashes = {int(p.stem.split("_")[1]): p.read_text() for p in reports.glob("rank_*.crash")}
    if not crashes and codes and set(codes.values()) == {2}:  # e.g. argparse: each rank printed why
        return LaunchFailed(f"{_ranks(sorted(codes))} stopped on a usage error (see above)", 2)
    for rank, trace in sorted(crashes.items()):
        say("distillery", f"rank {rank} crashed:\n{trace.rstrip()}")
    ended = [f"rank {rank} {_how(codes.get(rank))}" for rank in sorted(set(crashes) | set(codes))]
    return LaunchFailed("the job failed: " + "; ".join(ended) + (" (tracebacks above)" if crashes else ""), 1)


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _how(code: int | None) -> str:
    if code is None:
        return "crashed"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
