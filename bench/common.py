"""Shared set-up of the benchmarks: the demo campaign's data stages, run (or skipped) before measuring."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def ensure_data_stages(
    config_path: str, stages: tuple[str, ...] = ("corpus", "tokenizer", "prepare")
) -> object:
    """Load the campaign config and run the stages it needs that it has (complete ones are skipped), so
    every benchmark runs on a fresh clone after `bash scripts/setup.sh`."""
    from distill.config import load_config
    from launcher.campaign import RunOptions, run_stages

    config = load_config(config_path)
    run_stages(config, list(stages), RunOptions(progress=False))
    return config


def write_result(out: str, result: dict, *, echo: bool = True) -> None:
    """Write a benchmark's JSON result (bench/results/...) and print it (unless `echo` is off)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if echo:
        print(json.dumps(result, indent=2))


def variant_config(
    config_path: str, base: object, tmp: str, name: str, steps: int, *overrides: str
) -> object:
    """A variant of the demo campaign for a side-by-side run: its own run directory under `tmp`, the
    base campaign's prepared data and cache, one shared random student init, tp1 in this process."""
    from distill.config import load_config

    return load_config(
        config_path,
        [
            f"run.dir={tmp}/{name}",
            f"data.dir={base.data.dir}",
            f"cache.dir={base.cache.dir}",
            f"student.init_dir={tmp}/student-init",
            f"training.steps={steps}",
            "training.log_interval=50",
            "checkpoint.interval=1000000",
            "parallel.tp=1",
            "parallel.pp=1",
            *overrides,
        ],
    )
