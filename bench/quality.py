"""What each distillation method buys at equal tokens, in held-out bits per byte (not run by CI; ~30 min).

    .venv/bin/python bench/quality.py [--steps 150] [--seeds 1234 1235] [--config configs/demo.yaml]

On the demo corpus and teacher, the demo student is trained from the same random init (one per seed)
for the same steps and batches (equal tokens) with:

- `ce`: next-token cross-entropy only (the baseline);
- `topk64`, `topk8`: forward KL against a top-k cache (k = 64, and a small k = 8) with its tail bucket;
- `rskd`: forward KL against the sampled cache (RS-KD, 50 draws per position: the demo's default);
- `online`: forward KL against the live teacher's full distribution (dense, no cache);
- `taid`: TAID against the top-64 cache;
- `taid_ddk`: TAID with the DDK domain mixture (reweighted every 30 steps).

Each student is then scored by `distillery eval` (documents of the first 32 held-out sequences per
domain, rolling windows) in bits per byte; two seeds per method show the noise. Runs at tp1 in this
process; the caches are built first (the demo's sampled cache, and top-k caches beside it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, ensure_data_stages, write_result

METHODS = {
    "ce": ("none", ["loss.weights.ce=1.0", "loss.weights.forward_kl=0.0"]),
    "topk64": ("topk64", ["loss.weights.ce=0.0", "loss.weights.forward_kl=1.0"]),
    "topk8": ("topk8", ["loss.weights.ce=0.0", "loss.weights.forward_kl=1.0"]),
    "rskd": ("sampled", ["loss.weights.ce=0.0", "loss.weights.forward_kl=1.0"]),
    "online": ("online", ["loss.weights.ce=0.0", "loss.weights.forward_kl=1.0"]),
    "taid": ("topk64", ["loss.weights.ce=0.0", "loss.weights.forward_kl=0.0", "loss.weights.taid=1.0"]),
    "taid_ddk": (
        "topk64",
        [
            "loss.weights.ce=0.0",
            "loss.weights.forward_kl=0.0",
            "loss.weights.taid=1.0",
            "data.mixture.type=ddk",
            "data.mixture.interval=30",
        ],
    ),
}


def teacher_overrides(signal: str, caches: dict[str, Path]) -> list[str]:
    if signal == "online":
        return ["teacher.mode=online", "cache=null"]
    if signal == "none":
        return ["cache=null", "teacher=null"]
    return [f"cache.dir={caches[signal]}"] + (
        ["cache.mode=topk", f"cache.k={signal.removeprefix('topk')}"] if signal.startswith("topk") else []
    )


def build_caches(config_path: str, base, root: Path) -> dict[str, Path]:
    """The demo's sampled cache, and top-k caches of k = 64 and 8 next to it (each built once)."""
    from distill.config import load_config
    from launcher.campaign import RunOptions, run_stages

    caches = {"sampled": base.cache.dir}
    for k in (64, 8):
        caches[f"topk{k}"] = root / f"cache-topk{k}"
        config = load_config(
            config_path,
            [
                f"cache.dir={caches[f'topk{k}']}",
                "cache.mode=topk",
                f"cache.k={k}",
                "loss.weights.forward_kl=0.0",
                "loss.weights.ce=1.0",
            ],
        )
        run_stages(config, ["cache"], RunOptions(progress=False))
    return caches


def train_and_score(
    config_path: str, base, overrides: list[str], tmp: str, name: str, seed: int, steps: int
) -> dict:
    from distill.config import load_config
    from distill.data.prepared import PreparedData
    from distill.eval.score import score_model
    from distill.training.train import build_loop
    from parallel.distributed import init_parallel, shutdown

    config = load_config(
        config_path,
        [
            f"run.dir={tmp}/{name}-{seed}",
            f"data.dir={base.data.dir}",
            f"student.init_dir={tmp}/student-init-{seed}",
            f"training.steps={steps}",
            f"training.seed={seed}",
            "training.log_interval=50",
            "training.eval_interval=0",
            "checkpoint.interval=1000000",
            "parallel.tp=1",
            "parallel.pp=1",
            "baseline=null",
            "eval=null",
            *overrides,
        ],
    )
    ctx = init_parallel(1, 1, seed=seed)
    started = time.perf_counter()
    loop = build_loop(config, ctx)
    trained = loop.run()
    seconds = time.perf_counter() - started
    shutdown()
    scores = score_model(config.checkpoint.dir, PreparedData(base.data.dir), sequences=32, progress=False)
    return {
        "bits_per_byte": {d: s["bits_per_byte"] for d, s in scores["domains"].items()},
        "all": scores["all"]["bits_per_byte"],
        "final_train_loss": trained[-1].loss,
        "seconds_per_step": seconds / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="default: the config's training.steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "quality.json"))
    args = parser.parse_args()

    from distill.data.prepared import PreparedData
    from distill.eval.score import score_model

    base = ensure_data_stages(args.config, ("corpus", "tokenizer", "prepare", "cache"))
    steps = args.steps or base.training.steps
    caches = build_caches(args.config, base, base.run.dir / "bench")
    runs: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            signal, overrides = METHODS[name]
            for seed in args.seeds:
                result = train_and_score(
                    args.config, base, teacher_overrides(signal, caches) + overrides, tmp, name, seed, steps
                )
                runs.setdefault(name, {})[seed] = result
                print(
                    f"{name} seed {seed}: {result['all']:.4f} bits/byte, {result['seconds_per_step']:.2f} s/step"
                )
    teacher = score_model(base.teacher.path, PreparedData(base.data.dir), sequences=32, progress=False)
    summary = {}
    for name, by_seed in runs.items():
        values = [r["all"] for r in by_seed.values()]
        domains = next(iter(by_seed.values()))["bits_per_byte"]
        summary[name] = {
            "all_mean": statistics.mean(values),
            "all_spread": max(values) - min(values),
            "domains_mean": {
                d: statistics.mean(r["bits_per_byte"][d] for r in by_seed.values()) for d in domains
            },
            "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in by_seed.values()),
        }
    write_result(
        args.out,
        {
            "steps": steps,
            "tokens": steps * base.training.global_batch * base.data.seq_len,
            "seeds": args.seeds,
            "teacher": {
                "all": teacher["all"]["bits_per_byte"],
                "domains": {d: s["bits_per_byte"] for d, s in teacher["domains"].items()},
            },
            "summary": summary,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
