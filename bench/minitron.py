"""Minitron on the demo: a student pruned from the teacher vs a random init of the same shape, at equal
tokens (not run by CI; ~25 min on 2 CPU cores).

    .venv/bin/python bench/minitron.py [--seeds 1234 4321] [--steps 150] [--base-dir runs/demo_minitron]

Two shapes, each pruned from the demo teacher (4 layers, hidden 192, 6 heads in 2 groups, FFN 512):

- `width`: `configs/demo_minitron.yaml`'s student (4 layers, hidden 96, 4 heads in 2 groups, FFN 256);
- `depth`: one of the teacher's layers at its full width (its non-embedding parameters, 0.39M, about the
  width student's 0.44M), the layers chosen by the default `depth_metric` (loss); the calibration loss of
  the block-importance choice is read from the same scores.

Each shape trains from its pruned weights and from a random init of the same architecture (the run's
seed), per seed, for the same steps and batches against the demo's sampled cache (RS-KD). Held-out bits
per byte per domain every 15 steps (the loop's evaluation: the first 32 held-out sequences per domain);
the table is the final one, and `tokens_to_match` is the tokens the pruned student needed to reach its
random init's final mean. Written to `bench/results/minitron.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, write_result

CONFIG = "configs/demo_minitron.yaml"
DEPTH_SHAPE = [  # one layer of the teacher, whole
    "student.arch.hidden_size=192",
    "student.arch.num_layers=1",
    "student.arch.num_attention_heads=6",
    "student.arch.num_key_value_heads=2",
    "student.arch.ffn_hidden_size=512",
    "prune.method=depth",
]
EVAL_INTERVAL = 15


def evals(metrics: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, {domain: bits per byte}) of every held-out evaluation of a run."""
    found = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        domains = {
            k.split("/")[1]: v for k, v in record.items() if k.startswith("eval/") and k.endswith("/bpb")
        }
        if domains:
            found.append((record["step"], domains))
    return found


def mean(scores: dict[str, float]) -> float:
    return statistics.fmean(scores.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 4321])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--base-dir", default="runs/demo_minitron", help="where the demo's data and cache are"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "minitron.json"))
    args = parser.parse_args()
    from distill.atomic import read_json
    from distill.config import load_config
    from distill.models.student import write_random_student
    from distill.prune.stage import PruneStage
    from launcher.campaign import RunOptions, run_stages

    config_path = str(REPO / CONFIG)
    base = load_config(config_path, [f"run.dir={args.base_dir}"])
    run_stages(base, ["corpus", "tokenizer", "prepare", "cache"], RunOptions(progress=False))
    tmp = Path(tempfile.mkdtemp(prefix="minitron-"))
    shared = [f"data.dir={base.data.dir}", f"cache.dir={base.cache.dir}", f"run.dir={tmp}/prune"]
    result: dict = {"config": CONFIG, "steps": args.steps, "seeds": args.seeds, "shapes": {}}
    started = time.monotonic()
    for shape, overrides in (("width", []), ("depth", DEPTH_SHAPE)):
        pruning = load_config(
            config_path,
            [*shared, f"student.init_dir={tmp}/{shape}/pruned", f"prune.dir={tmp}/{shape}/prune", *overrides],
        )
        run_stages(pruning, ["prune"], RunOptions(progress=False))
        stage = PruneStage(pruning)
        scores = read_json(pruning.prune.dir / "importance.json")["scores"]
        step0 = read_json(pruning.prune.dir / "step0" / "eval.json")["models"]
        entry: dict = {
            "arch": stage.target.to_json(),
            "parameters": stage.target.num_parameters(),
            "kept_layers": read_json(pruning.student.init_dir / "distillery_prune.json")["kept"]["layers"],
            "step0_bpb": {name: model["all"]["bits_per_byte"] for name, model in step0.items()},
            "depth_loss": scores.get("depth_loss"),
            "runs": {},
        }
        for seed in args.seeds:
            random_dir = tmp / shape / f"random-{seed}"
            write_random_student(
                stage.target, random_dir, tokenizer_dir=stage.weights.tokenizer_dir, seed=seed
            )
            for init, directory in (("pruned", pruning.student.init_dir), ("random", random_dir)):
                name = f"{shape}-{init}-{seed}"
                config = load_config(
                    config_path,
                    [
                        *shared,
                        f"run.dir={tmp}/{name}",
                        "prune=null",
                        "student.arch=null",
                        "student.init_dir=null",
                        f"student.init={directory}",
                        f"training.seed={seed}",
                        f"training.steps={args.steps}",
                        f"training.eval_interval={EVAL_INTERVAL}",
                        "checkpoint.interval=1000000",
                        "export=null",
                        "eval=null",
                    ],
                )
                run_stages(config, ["train"], RunOptions(progress=False))
                curve = evals(config.logging.metrics)
                entry["runs"][name] = {
                    "final": curve[-1][1],
                    "curve": [(step, mean(scores)) for step, scores in curve],
                }
                print(f"{name}: {curve[-1][1]} ({time.monotonic() - started:.0f}s)", flush=True)
        tokens_per_step = base.training.global_batch * base.data.seq_len
        for seed in args.seeds:
            pruned, random = entry["runs"][f"{shape}-pruned-{seed}"], entry["runs"][f"{shape}-random-{seed}"]
            target = mean(random["final"])
            reached = next((step for step, value in pruned["curve"] if value <= target), None)
            pruned["tokens_to_match"] = None if reached is None else reached * tokens_per_step
            pruned["random_final_tokens"] = args.steps * tokens_per_step
        result["shapes"][shape] = entry
    result["seconds"] = round(time.monotonic() - started)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
