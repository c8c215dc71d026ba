"""DDK vs uniform mixing on the demo corpus at equal tokens, plus the costs of the mixture machinery.

    .venv/bin/python bench/ddk.py [--steps 150] [--interval 25] [--config configs/demo.yaml]

Both runs distil the same random student from the demo cache (RS-KD, the demo's loss) on the same
number of global batches; only `data.mixture` differs (uniform vs ddk). Reported: held-out perplexity
per domain, student/teacher perplexity ratio per domain and its worst value, DDK's weight trajectory,
the DDK evaluations' share of training time, and the sampler's cost per global batch (demo batch and a
cluster-sized one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REPO, ensure_data_stages, variant_config, write_result


def sampler_seconds_per_batch(sizes: dict[str, int], global_batch: int, batches: int = 50) -> float:
    from distill.data.mixture import MixtureSampler

    sampler = MixtureSampler(sizes, dict.fromkeys(sizes, 1.0), seed=0)
    started = time.perf_counter()
    for _ in range(batches):
        sampler.draw(global_batch)
    return (time.perf_counter() - started) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="default: the config's training.steps")
    parser.add_argument(
        "--interval", type=int, default=None, help="default: the config's data.mixture.interval"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "ddk.json"))
    args = parser.parse_args()

    from distill.training.train import build_loop
    from parallel.distributed import init_parallel, shutdown

    base = ensure_data_stages(args.config, ("corpus", "tokenizer", "prepare", "cache"))
    steps = args.steps or base.training.steps
    interval = args.interval or base.data.mixture.interval
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("uniform", "ddk"):
            config = variant_config(
                args.config,
                base,
                tmp,
                name,
                steps,
                f"data.mixture.type={name}",
                f"data.mixture.interval={interval}",
            )
            ctx = init_parallel(1, 1, seed=config.training.seed)
            started = time.perf_counter()
            trainer = build_loop(config, ctx)
            trained = trainer.run()
            total = time.perf_counter() - started
            step_seconds = sum(r.seconds for r in trained)
            student = trainer.evaluate()
            teacher = trainer.heldout.teacher_perplexity()
            ratio = {d: student[d] / teacher[d] for d in student}
            records = [json.loads(line) for line in Path(config.logging.metrics).read_text().splitlines()]
            results[name] = {
                "heldout_perplexity": student,
                "teacher_heldout_perplexity": teacher,
                "ratio_student_over_teacher": ratio,
                "worst_ratio": max(ratio.values()),
                "mean_ratio": sum(ratio.values()) / len(ratio),
                "weights": [
                    {"step": r["step"], **{k[8:]: v for k, v in r.items() if k.startswith("mixture/")}}
                    for r in records
                    if any(k.startswith("mixture/") for k in r)
                ],
                "training_seconds": step_seconds,
                "run_seconds": total,
                "sizes": trainer.mixture.sampler.sizes_dict(),
            }
            shutdown()
    ddk = results["ddk"]
    evaluations = len(ddk["weights"])  # r_0 and every interval
    eval_seconds = (
        ddk["run_seconds"]
        - ddk["training_seconds"]
        - (results["uniform"]["run_seconds"] - results["uniform"]["training_seconds"])
    )
    sizes = ddk["sizes"]
    result = {
        "steps": steps,
        "interval": interval,
        "tokens": steps * base.training.global_batch * base.data.seq_len,
        **results,
        "worst_ratio_ddk_over_uniform": ddk["worst_ratio"] / results["uniform"]["worst_ratio"],
        "ddk_evaluations": evaluations,
        "ddk_eval_share_of_training_time": max(eval_seconds, 0.0) / ddk["training_seconds"],
        "sampler_seconds_per_batch": {
            str(base.training.global_batch): sampler_seconds_per_batch(sizes, base.training.global_batch),
            "1024": sampler_seconds_per_batch(sizes, 1024, batches=10),
        },
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
