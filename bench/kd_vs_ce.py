"""Does distillation from the cache help? The demo student trained with CE only vs with cached KD, on the
same batches (same seed, same steps: equal tokens), compared by held-out perplexity per domain.

    .venv/bin/python bench/kd_vs_ce.py [--steps 150] [--config configs/demo.yaml]

Uses the demo campaign's prepared data and teacher cache (built first if missing). Each variant starts
from the same random student and runs in this process at tp1. Reported: held-out perplexity per domain
of each variant and of the teacher (from the cache's stored target log-probs), and seconds per step.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

from common import REPO, ensure_data_stages, variant_config, write_result

VARIANTS = {
    "ce": ["loss.weights.ce=1.0", "loss.weights.forward_kl=0.0"],
    "kd": ["loss.weights.ce=0.0", "loss.weights.forward_kl=1.0"],
    "ce+kd": ["loss.weights.ce=0.5", "loss.weights.forward_kl=0.5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="default: the config's training.steps")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "kd_vs_ce.json"))
    args = parser.parse_args()

    from distill.cache.inspect import inspect_cache
    from distill.training.train import build_loop
    from parallel.distributed import init_parallel, shutdown

    base = ensure_data_stages(args.config, ("corpus", "tokenizer", "prepare", "cache"))
    steps = args.steps or base.training.steps
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            config = variant_config(args.config, base, tmp, name, steps, *overrides)
            ctx = init_parallel(1, 1, seed=config.training.seed)
            started = time.perf_counter()
            trainer = build_loop(config, ctx)
            trained = trainer.run()
            seconds = time.perf_counter() - started
            results[name] = {
                "heldout_perplexity": trainer.evaluate(),
                "final_train_loss": trained[-1].loss,
                "seconds_per_step": seconds / steps,
            }
            shutdown()
    teacher = inspect_cache(base.cache.dir, sequences=1)["teacher_heldout_perplexity"]
    ce = results["ce"]["heldout_perplexity"]
    result = {
        "steps": steps,
        "tokens": steps * base.training.global_batch * (base.data.seq_len),
        "teacher_heldout_perplexity": teacher,
        **{name: r for name, r in results.items()},
        "perplexity_ratio_kd_over_ce": {d: results["kd"]["heldout_perplexity"][d] / ce[d] for d in ce},
        "mean_log_perplexity": {
            name: sum(math.log(v) for v in r["heldout_perplexity"].values()) / len(ce)
            for name, r in results.items()
        },
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
