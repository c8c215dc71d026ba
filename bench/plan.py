"""How close `distillery plan` comes on this machine: step time planned from a measured throughput, and host
memory (not run by CI; ~6 min on 2 CPU cores).

    .venv/bin/python bench/plan.py [--steps 30]

1. The demo student trains `--steps` steps at the demo's batch (16 x 256 tokens, micro-batch 8): its
   metrics give the achieved model TFLOP/s.
2. `distillery plan` of two variants, planned from run 1's metrics by model FLOPs: a larger batch (32 x 256,
   micro-batch 16) and a smaller one (8 x 256, micro-batch 4). Each variant then trains and its measured
   median step time is set beside the planned one (ratio measured / planned; the issue's bar is within 25%).
3. Host memory: each run's peak RSS above the post-import baseline (a process that imports torch,
   megatron-core and distillery and builds nothing) beside the plan's memory total for the stage (weights,
   gradients, optimizer, activations, loss buffers, fp32 on CPU).

Written to `bench/results/plan.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, ensure_data_stages, write_result

CONFIG = "configs/demo.yaml"
IMPORTS = (
    "import resource, torch, megatron.core, deepspeed; import distill.training.train, distill.engine.megatron.engine; "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def post_import_rss_bytes() -> int:
    found = subprocess.run(
        [sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True, cwd=REPO
    )
    return int(found.stdout.strip().splitlines()[-1]) * 1024


def run(config_path: str, base, root: Path, name: str, steps: int, *overrides: str) -> dict:
    from distill.config import load_config
    from distill.plan.campaign import plan_campaign
    from launcher.campaign import RunOptions, run_stages

    config = load_config(
        config_path,
        [
            f"run.dir={root}/{name}",
            f"data.dir={base.data.dir}",
            f"cache.dir={base.cache.dir}",
            f"student.init_dir={root}/student-init",
            f"training.steps={steps}",
            "training.log_interval=1",
            "training.eval_interval=0",
            "training.eval_sequences=0",
            "training.warmup_steps=0",
            "checkpoint.interval=1000000",
            *overrides,
        ],
    )
    run_stages(config, ["train"], RunOptions(progress=False))
    metrics = [json.loads(line) for line in config.logging.metrics.read_text().splitlines()]
    steps_seen = [m for m in metrics if "step_seconds" in m][2:]  # the first steps warm up
    return {
        "config": config,
        "step_seconds": statistics.median(m["step_seconds"] for m in steps_seen),
        "tflops_per_device": statistics.median(m["tflops_per_device"] for m in steps_seen),
        "peak_rss_bytes": max(m["memory/host_peak_gib"] for m in metrics if "memory/host_peak_gib" in m)
        * 2**30,
        "plan": plan_campaign(config, None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "plan.json"))
    args = parser.parse_args()
    from distill.config import load_config
    from distill.plan.campaign import plan_campaign

    config_path = str(REPO / CONFIG)
    base = ensure_data_stages(config_path, ("corpus", "tokenizer", "prepare", "cache"))
    root = Path(tempfile.mkdtemp(prefix="plan-"))
    baseline_rss = post_import_rss_bytes()
    measured = run(config_path, base, root, "measured", args.steps)
    result = {"steps": args.steps, "post_import_rss_bytes": baseline_rss, "runs": {}}
    variants = {
        "demo (16 x 256, measured)": (),
        "batch 32 x 256, micro-batch 16": ("training.global_batch=32", "training.micro_batch=16"),
        "batch 8 x 256, micro-batch 4": ("training.global_batch=8", "training.micro_batch=4"),
    }
    for name, overrides in variants.items():
        label = name.split(",")[0].replace(" ", "_")
        found = measured if not overrides else run(config_path, base, root, label, args.steps, *overrides)
        config = found["config"]
        # planned from the first run's throughput: the variant's config, with the first run's metrics
        planning = load_config(
            config_path,
            [
                f"run.dir={root}/plan-{len(result['runs'])}",
                f"logging.metrics={measured['config'].logging.metrics}",
                f"training.steps={args.steps}",
                *overrides,
            ],
        )
        plan = plan_campaign(planning, None)
        train = next(s for s in plan.stages if s.stage == "train")
        assert config.training is not None
        planned_step = train.seconds / config.training.steps
        stage = next(s for s in found["plan"].stages if s.stage == "train")
        result["runs"][name] = {
            "measured_step_seconds": found["step_seconds"],
            "planned_step_seconds": planned_step,
            "measured_over_planned": found["step_seconds"] / planned_step,
            "peak_rss_above_imports_bytes": found["peak_rss_bytes"] - baseline_rss,
            "planned_memory_bytes": stage.memory_total,
        }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
