"""Training metrics: a JSON-lines file always, Weights & Biases when configured; main rank only.

The JSONL file is the record a person (or `report`) reads after the run; wandb is the live view.
`WANDB_MODE=offline` (the default here) writes wandb's run files under the run directory without any
network, so the same config works on an air-gapped cluster and syncs later with `wandb sync`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from distill.config.schema import LoggingConfig


class MetricsLogger:
    def __init__(
        self, cfg: LoggingConfig, *, enabled: bool, run_name: str, run_dir: Path, config: dict[str, Any]
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._wandb = None
        if not enabled:
            return
        cfg.metrics.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(cfg.metrics, "a", encoding="utf-8")
        if cfg.wandb is not None and cfg.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=run_name,
                mode=cfg.wandb.mode,
                dir=str(run_dir),
                config=config,
                resume="allow",
                id=run_name.replace("/", "-"),
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
