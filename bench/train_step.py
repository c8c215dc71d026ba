"""Training step time, side by side in one run:

- distillery with CE only (megatron-core GPTModel, DDP, pipeline schedule, fused output-layer loss, our
  AdamW) vs the same model as plain Hugging Face `LlamaForCausalLM` with `torch.optim.AdamW`;
- distillery with cached KD (the demo's teacher cache, forward KL) vs distillery with CE;
- distillery with the online teacher (the demo teacher run live, forward KL) vs distillery with CE;
- the DeepSpeed engine (the HF module under ZeRO-2, one rank) vs the megatron engine, CE, same model and
  batches: step time and peak memory. Each engine trains in a child process of its own, so its peak
  (host RSS above what the process held after imports; the CUDA allocator's peak on GPU) is its own.

    .venv/bin/python bench/train_step.py [--steps 12] [--config configs/demo.yaml]

All start from the same weights (the campaign's random student init) and train on the same global
batches (gradient accumulation over the same micro-batches), clip gradients and step AdamW. Reported:
median step seconds of each after warm-up and the ratios. Runs at tp1 pp1 in one process; uses the
demo campaign's prepared data and cache (built first if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, ensure_data_stages, write_result


def hf_steps(init_dir: Path, batches: list[torch.Tensor], micro_batch: int, cfg) -> list[float]:
    from transformers import AutoModelForCausalLM

    from distill.engine.schedule import lr_at

    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    times = []
    for step, tokens in enumerate(batches):
        started = time.perf_counter()
        micro = tokens.split(micro_batch)
        for part in micro:
            out = model(input_ids=part[:, :-1], labels=part[:, :-1].clone())  # HF shifts labels itself
            (out.loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def engine_child(
    config_path: str,
    data_dir: str,
    cache_dir: str,
    init_dir: str,
    run_dir: str,
    engine: str,
    steps: int,
    warmup: int,
) -> None:
    """In a child process: train `steps` CE steps with `engine`, print median step time and peak memory."""
    from distill.config import load_config
    from distill.training.train import build_loop

    if engine == "deepspeed":
        import deepspeed  # noqa: F401 (imported before the baseline: library code is not training memory)
    else:
        import megatron.core  # noqa: F401
    config = load_config(
        config_path,
        [
            f"run.dir={run_dir}",
            f"data.dir={data_dir}",
            f"cache.dir={cache_dir}",
            f"student.init_dir={init_dir}",
            f"training.steps={steps}",
            "training.warmup_steps=1",
            "training.log_interval=1000000",
            "training.eval_sequences=0",
            "checkpoint.interval=1000000",
            "loss.weights.ce=1.0",
            "loss.weights.forward_kl=0.0",
            f"engine={engine}",
            "parallel.tp=1",
            "parallel.pp=1",
            *(["deepspeed.zero_stage=2"] if engine == "deepspeed" else []),
        ],
    )
    baseline = _rss_mib()
    trainer = build_loop(config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = [trainer.train_step().seconds for _ in range(steps)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss - baseline
    trainer.engine.close()
    print(json.dumps({"step_s": statistics.median(times[warmup:]), "peak_mib": memory}))


def engines_side_by_side(args: argparse.Namespace, base: object, tmp: str) -> dict[str, dict]:
    found = {}
    for engine in ("megatron", "deepspeed"):
        command = [
            sys.executable,
            __file__,
            "--child",
            engine,
            "--config",
            args.config,
            "--steps",
            str(args.steps),
        ]
        command += [
            "--warmup",
            str(args.warmup),
            "--child-dirs",
            str(base.data.dir),
            str(base.cache.dir),
            f"{tmp}/student-init",
            f"{tmp}/{engine}",
        ]
        world = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # a world of its own
        env = {k: v for k, v in os.environ.items() if k not in world}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the {engine} engine's run failed:\n{done.stderr[-3000:]}")
        found[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    parser.add_argument("--child", choices=["megatron", "deepspeed"], help=argparse.SUPPRESS)
    parser.add_argument("--child-dirs", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine_child(args.config, *args.child_dirs, args.child, args.steps, args.warmup)
        return

    from distill.config import load_config
    from distill.training.ddk import DomainMixture
    from distill.training.train import build_loop
    from parallel.distributed import init_parallel, shutdown

    base = ensure_data_stages(args.config, ("corpus", "tokenizer", "prepare", "cache"))
    variants = {
        "ce": ["loss.weights.ce=1.0", "loss.weights.forward_kl=0.0"],
        "cached_kd": ["loss.weights.ce=0.0", "loss.weights.forward_kl=1.0"],
        "online_kd": [
            "loss.weights.ce=0.0",
            "loss.weights.forward_kl=1.0",
            "cache=null",
            "teacher.mode=online",
            "teacher.parallel=null",
        ],
    }
    ours: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants.items():
            config = load_config(
                args.config,
                [
                    f"run.dir={tmp}/{name}",
                    f"data.dir={base.data.dir}",
                    f"student.init_dir={tmp}/student-init",
                    f"training.steps={args.steps}",
                    "training.warmup_steps=1",
                    "training.log_interval=1000000",
                    "training.eval_sequences=0",
                    "checkpoint.interval=1000000",
                    "parallel.tp=1",
                    "parallel.pp=1",
                    *([f"cache.dir={base.cache.dir}"] if name != "online_kd" else []),
                    *overrides,
                ],
            )
            ctx = init_parallel(1, 1, seed=config.training.seed)
            trainer = build_loop(config, ctx)
            times = [trainer.train_step().seconds for _ in range(args.steps)]
            ours[name] = statistics.median(times[args.warmup :])
            if name == "ce":
                mixture = DomainMixture(
                    config.data.mixture, trainer.mixture.sampler.sizes_dict(), config.training.seed
                )
                rows = [mixture.next_batch(config.training.global_batch) for _ in range(args.steps)]
                batches = [
                    torch.from_numpy(np.stack([trainer.data.sequence(d, i) for d, i in r])) for r in rows
                ]
                parameters, init_dir, seq_len = (
                    trainer.engine.num_parameters,
                    config.student.init_dir,
                    trainer.data.seq_len,
                )
            shutdown()
        theirs = hf_steps(init_dir, batches, config.training.micro_batch, config.training)
        engines = engines_side_by_side(args, base, tmp)
    theirs_s = statistics.median(theirs[args.warmup :])
    result = {
        "model_parameters": parameters,
        "global_batch": config.training.global_batch,
        "micro_batch": config.training.micro_batch,
        "seq_len": seq_len,
        "steps_timed": args.steps - args.warmup,
        "distillery_ce_step_s": ours["ce"],
        "distillery_cached_kd_step_s": ours["cached_kd"],
        "distillery_online_kd_step_s": ours["online_kd"],
        "hf_ce_step_s": theirs_s,
        "ratio_distillery_ce_over_hf": ours["ce"] / theirs_s,
        "ratio_cached_kd_over_ce": ours["cached_kd"] / ours["ce"],
        "ratio_online_kd_over_ce": ours["online_kd"] / ours["ce"],
        "megatron_engine_ce_step_s": engines["megatron"]["step_s"],
        "deepspeed_zero2_ce_step_s": engines["deepspeed"]["step_s"],
        "ratio_deepspeed_over_megatron_step": engines["deepspeed"]["step_s"] / engines["megatron"]["step_s"],
        "memory": "cuda allocator peak"
        if torch.cuda.is_available()
        else "host RSS peak above the post-import baseline",
        "megatron_engine_peak_mib": engines["megatron"]["peak_mib"],
        "deepspeed_zero2_peak_mib": engines["deepspeed"]["peak_mib"],
        "ratio_deepspeed_over_megatron_memory": engines["deepspeed"]["peak_mib"]
        / engines["megatron"]["peak_mib"],
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
