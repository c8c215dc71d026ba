"""Reading a run's `metrics.jsonl` into series a plot or a table can use.

The file is append-only: a resumed run appends again from its checkpoint's step, so the same step can
appear twice; the later record wins (it is the one the final model descends from). A line that is not
JSON (a run killed mid-write) is skipped and counted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DataError


@dataclass
class Metrics:
    path: Path
    series: dict[str, dict[int, float | str]] = field(default_factory=lambda: defaultdict(dict))
    skipped_lines: int = 0

    def steps(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a numeric metric, in step order."""
        found = sorted((s, v) for s, v in self.series.get(key, {}).items() if isinstance(v, int | float))
        return [s for s, _ in found], [float(v) for _, v in found]

    def last(self, key: str) -> float | str | None:
        values = self.series.get(key)
        return values[max(values)] if values else None

    def keys_like(self, prefix: str, suffix: str = "") -> list[str]:
        return sorted(k for k in self.series if k.startswith(prefix) and k.endswith(suffix))


def read_metrics(path: Path) -> Metrics:
    """The metrics of one run; a clear error when the file is missing or holds no step."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no metrics file (a run writes it while it trains: logging.metrics)")
    metrics = Metrics(path)
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                metrics.skipped_lines += 1
                continue
            for key, value in record.items():
                if key not in ("step", "time"):
                    metrics.series[key][step] = value
    if not metrics.series:
        raise DataError(f"{path} holds no metrics record; has the run logged a step yet?")
    return metrics
