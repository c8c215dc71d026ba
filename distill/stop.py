"""Stop requests: a job asked to end early (preemption, a time limit, a budget) saves and exits, resumable.

Three things ask a rank to stop:

- **a signal**: SIGTERM (what Slurm sends on preemption, `scontrol requeue` and `scancel`) or SIGUSR1 /
  SIGUSR2 sent to the rank itself;
- **a stop file**: the path in `DISTILLERY_STOP_FILE`. Slurm's `--signal=B:USR1@grace` reaches only the
  batch script (`B:`), which writes this file on the shared file system; every rank on every node sees
  it. Going through a file, not a signal, keeps torchrun's agent and NCCL out of it: the agent turns
  SIGTERM/SIGINT into a shutdown of its workers, and an unhandled SIGUSR1 kills a process;
- **a wall-time budget**: `DISTILLERY_STOP_AFTER` seconds after the process started.

Ranks see these at different moments, so a rank never acts on its own view: at each step boundary
(and between the passes of an evaluation, a DDK update or the cache writer's shards) every rank calls
`agreed(reduce)`, which sums the local flags over all ranks; all get the same answer at the same point
and stop together. A stopped stage raises `StopRequested` after saving what it needs; the CLI turns it
into exit code `EXIT_STOPPED` (75, EX_TEMPFAIL), which the batch script reads as "requeue me".
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

STOP_FILE = "DISTILLERY_STOP_FILE"  # env: a file whose existence asks every rank to stop
STOP_AFTER = "DISTILLERY_STOP_AFTER"  # env: seconds after start at which to stop
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request; re-running resumes
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

Reduce = Callable[["torch.Tensor"], None]  # an in-place sum over every rank of the job


class StopRequested(Exception):
    """Every rank agreed to stop; what was in flight is saved (or redone on resume)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"stopped on request ({reason}); re-running the stage resumes it")
        self.reason = reason


class StopRequest:
    """This process's view of a stop request (see the module docstring)."""

    def __init__(self, stop_file: Path | None = None, budget_seconds: float | None = None) -> None:
        self.stop_file = stop_file
        self.deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
        self.signalled: str | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def from_environment(cls) -> StopRequest:
        path = os.environ.get(STOP_FILE)
        budget = os.environ.get(STOP_AFTER)
        return cls(Path(path) if path else None, float(budget) if budget else None)

    def install(self) -> StopRequest:
        """Catch SIGTERM / SIGUSR1 / SIGUSR2 (main thread only) instead of dying on them."""
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = signal.Signals(signum).name

    def local(self) -> str | None:
        """Why this rank would stop now, or None."""
        if self.signalled is not None:
            return self.signalled
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "wall-time budget"
        return None

    def agreed(self, reduce: Reduce | None, device: torch.device | str = "cpu") -> str | None:
        """The job's decision at this point: a reason on every rank if any rank would stop, else None.
        Collective when `reduce` is given: every rank must call it at the same point."""
        import torch  # here, so that the CLI can name StopRequested without loading torch

        reason = self.local()
        if reduce is None:
            return reason
        flag = torch.tensor([1.0 if reason else 0.0], dtype=torch.float64, device=device)
        reduce(flag)
        if float(flag.item()) == 0.0:
            return None
        return reason or "another rank's request"

    def check(self, reduce: Reduce | None, device: torch.device | str = "cpu") -> None:
        """Raise `StopRequested` when the job agreed to stop (collective, like `agreed`)."""
        reason = self.agreed(reduce, device)
        if reason is not None:
            raise StopRequested(reason)


NEVER = StopRequest()  # no file, no budget, no handlers: for callers outside a stoppable stage
