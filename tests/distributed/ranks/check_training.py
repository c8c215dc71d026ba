"""Train the same model from the same HF weights for a few steps at several layouts; report losses.

argv: OUT_DIR WORK_DIR LAYOUTS... where a layout is `tp,pp` (dp follows from the world size) or
`resume:tp,pp>tp,pp` (train to the end at the first layout with a checkpoint half-way, then resume
from that checkpoint at the second layout), optionally with `@bf16` for bf16 weights. The shared
fixtures (tokenizer, prepared data, tiny HF Llama) are built by `tests/distributed/test_training.py`
before the launch.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from distill.config import load_config
from distill.training.train import build_loop
from parallel.distributed import init_parallel, shutdown
from tests.distributed import report


def run(config_path: Path, work: Path, name: str, tp: int, pp: int, overrides: list[str]) -> list[float]:
    run_dir = work / name
    config = load_config(
        config_path, [f"run.dir={run_dir}", f"parallel.tp={tp}", f"parallel.pp={pp}", *overrides]
    )
    ctx = init_parallel(tp, pp, seed=config.training.seed)
    if ctx.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    losses = [r.loss for r in build_loop(config, ctx).run()]
    dist.barrier()
    return losses


def main() -> None:
    out, work, *layouts = sys.argv[1:]
    config_path = Path(work) / "config.yaml"
    results: dict[str, list[float]] = {}
    for layout in layouts:
        layout, _, precision = layout.partition("@")  # e.g. resume:1,1>1,1@bf16
        extra = [f"training.precision={precision}"] if precision else []
        if layout.startswith("resume:"):
            first, second = (tuple(map(int, part.split(","))) for part in layout[7:].split(">"))
            name = f"resume_{first[0]}{first[1]}_{second[0]}{second[1]}{precision}"
            full = run(config_path, Path(work), name, *first, ["checkpoint.interval=3", *extra])
            ckpt = Path(work) / name / "checkpoints"
            if dist.get_rank() == 0:  # forget the end: resume from the step-3 checkpoint
                shutil.rmtree(ckpt / "step_00000006")
                (ckpt / "latest").write_text("step_00000003\n")
            dist.barrier()
            overrides = [
                f"run.dir={Path(work) / name}",
                f"parallel.tp={second[0]}",
                f"parallel.pp={second[1]}",
                *extra,
            ]
            config = load_config(config_path, overrides)
            ctx = init_parallel(second[0], second[1], seed=config.training.seed)
            resumed = [r.loss for r in build_loop(config, ctx).run()]
            results[name] = full
            results[name + "_resumed"] = resumed
        else:
            tp, pp = map(int, layout.split(","))
            dp = int(os.environ["WORLD_SIZE"]) // (tp * pp)
            results[f"tp{tp}pp{pp}dp{dp}{precision}"] = run(
                config_path, Path(work), f"layout_{tp}{pp}", tp, pp, extra
            )
    report(out, dist.get_rank(), {"losses": results})
    shutdown()


if __name__ == "__main__":
    main()
