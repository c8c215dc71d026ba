"""The consumed-samples log: which training sequences each optimizer step read, one JSON line per step.

It is how a preempted-and-resumed run shows that no sample was lost or repeated: the log of the
resumed run must equal the uninterrupted run's. Steps taken after the last checkpoint are redone by the
resumed run, so opening the log truncates it to the step the run resumed from (an atomic rewrite);
each line is flushed when its step finishes. Written by the main rank only: the global batch is the
same on every rank, and each data-parallel replica reads its contiguous slice of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from distill.atomic import atomic_write_text

Row = tuple[str, int]


def read_sample_log(path: Path) -> list[tuple[int, list[Row]]]:
    """Every (step, [(domain, index), ...]) line of a log."""
    out = []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        out.append((int(record["step"]), [(str(d), int(i)) for d, i in record["samples"]]))
    return out


class SampleLog:
    def __init__(self, path: Path, resumed_step: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    step = int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):
                    break  # a line cut by a crash: it and anything after it are redone
                if step > resumed_step:
                    break
                kept.append(line + "\n")
            atomic_write_text(self.path, "".join(kept))
        self.file: IO[str] | None = open(self.path, "a")

    def write(self, step: int, samples: list[Row]) -> None:
        assert self.file is not None
        self.file.write(json.dumps({"step": step, "samples": [[d, int(i)] for d, i in samples]}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
