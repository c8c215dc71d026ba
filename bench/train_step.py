"""Training step time: distillery (megatron-core GPTModel, DDP, pipeline schedule, our AdamW) vs the same
model as plain Hugging Face `LlamaForCausalLM` with `torch.optim.AdamW`, side by side in one run.

    .venv/bin/python bench/train_step.py [--steps 12] [--config configs/demo.yaml]

Both sides start from the same weights (the campaign's random student init), train on the same global
batches (gradient accumulation over the same micro-batches), clip gradients and step AdamW. Reported:
median step seconds of each after warm-up and the ratio distillery / HF (< 1 means we are faster).
Runs at tp1 pp1 in one process; uses the demo campaign's prepared data (built first if missing).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, ensure_data_stages, write_result


def hf_steps(init_dir: Path, batches: list[torch.Tensor], micro_batch: int, cfg) -> list[float]:
    from transformers import AutoModelForCausalLM

    from distill.training.optimizer import lr_at

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    args = parser.parse_args()

    from distill.config import load_config
    from distill.training.trainer import Trainer
    from parallel.distributed import init_parallel, shutdown

    base = ensure_data_stages(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            args.config,
            [
                f"run.dir={tmp}",
                f"data.dir={base.data.dir}",
                f"training.steps={args.steps}",
                "training.warmup_steps=1",
                "training.log_interval=1000000",
                "checkpoint.interval=1000000",
                "parallel.tp=1",
                "parallel.pp=1",
            ],
        ).model_copy(update={"cache": None, "teacher": None})  # CE only: the step without a teacher
        ctx = init_parallel(1, 1, seed=config.training.seed)
        trainer = Trainer(config, ctx)
        ours = []
        for _ in range(args.steps):
            ours.append(trainer.train_step().seconds)
        batches = [torch.from_numpy(trainer.batches.tokens(s, 0, 1)) for s in range(args.steps)]
        theirs = hf_steps(
            trainer.config.student.init_dir, batches, config.training.micro_batch, config.training
        )
        shutdown()
    ours_s, theirs_s = statistics.median(ours[args.warmup :]), statistics.median(theirs[args.warmup :])
    result = {
        "model_parameters": trainer.arch.num_parameters(),
        "global_batch": config.training.global_batch,
        "micro_batch": config.training.micro_batch,
        "seq_len": trainer.seq_len,
        "steps_timed": args.steps - args.warmup,
        "distillery_step_s": ours_s,
        "hf_step_s": theirs_s,
        "ratio_distillery_over_hf": ours_s / theirs_s,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
