"""Teacher cache costs, side by side in one run on the demo campaign's teacher and data.

    .venv/bin/python bench/cache.py [--sequences 64]

1. bytes per token of each mode (top-k k=64 + tail, sampled N=50) vs a float16 dense row (2 V bytes);
2. (teacher forward + extraction + encode + write) / (teacher forward alone) on the same sequences and
   micro-batches (target <= 1.15), for the 3M demo teacher and a random 63M teacher of the same vocabulary;
3. reader throughput (sequences/s decoded into loss tensors, random order, from the demo campaign's
   cache, built first if missing) / training consumption (sequences/s of the demo
   student's KD training step at tp1) (target >= 10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, ensure_data_stages, write_result


def write_large_teacher(demo_teacher: Path, out: Path) -> None:
    """A random 63M-parameter Llama with the demo teacher's tokenizer: where a real teacher's forward
    pass dominates, extraction is a small share (the demo teacher is mostly its 8k-wide output layer)."""
    from distill.models.student import write_random_student
    from parallel.model import ModelArch

    arch = ModelArch(
        model_type="llama",
        vocab_size=8192,
        hidden_size=768,
        num_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        ffn_hidden_size=2048,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    write_random_student(arch, out, tokenizer_dir=demo_teacher, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument(
        "--large-sequences",
        type=int,
        default=8,
        help="sequences for the overhead at a larger (63M) random teacher",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cache.json"))
    args = parser.parse_args()

    from distill.cache.reader import CacheReader
    from distill.cache.writer import CacheWriter, ShardWork
    from distill.config import load_config
    from distill.engine import teacher_job
    from distill.training.train import build_loop
    from parallel.distributed import init_parallel, shutdown

    base = ensure_data_stages(args.config, ("corpus", "tokenizer", "prepare", "cache"))
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = init_parallel(1, 1, seed=0)
        domain = base.data.domains and next(iter(base.data.domains))
        work = ShardWork(domain, "train", 0, 0, args.sequences)
        large_teacher = Path(tmp) / "large-teacher"
        write_large_teacher(Path(base.teacher.path), large_teacher)
        for name, teacher, sequences in (
            ("demo_teacher", base.teacher.path, args.sequences),
            ("large_teacher", large_teacher, args.large_sequences),
        ):
            work = ShardWork(domain, "train", 0, 0, sequences)
            for mode in ("topk", "sampled"):
                overrides = [
                    f"cache.dir={tmp}/{name}-{mode}",
                    f"cache.mode={mode}",
                    "cache.k=64",
                    "cache.samples=50",
                ]
                config = load_config(args.config, [*overrides, f"teacher.path={teacher}"])
                writer = CacheWriter(config, teacher_job(config, ctx), overwrite=True)
                (writer.out / domain / "train").mkdir(parents=True, exist_ok=True)
                started = time.perf_counter()
                writer._write_shard(work)
                with_extraction = time.perf_counter() - started
                tokens = torch.from_numpy(writer.data.store(domain, "train").batch(np.arange(sequences)))
                micro = list(tokens.split(config.teacher.micro_batch))
                started = time.perf_counter()
                writer.model.forward(
                    micro, lambda i, h, w, labels: torch.matmul(h, w.t())
                )  # forward + output layer
                forward_seconds = time.perf_counter() - started
                marker = json.loads((writer.out / f"{work.stem}.json").read_text())
                positions = sequences * writer.data.seq_len
                vocab = writer.arch.vocab_size
                result[f"{name}_{mode}"] = {
                    "teacher_parameters": writer.arch.num_parameters(),
                    "bytes_per_token": marker["bytes"] / positions,
                    "dense_fp16_bytes_per_token": 2 * vocab,
                    "cache_seconds": with_extraction,
                    "forward_only_seconds": forward_seconds,
                    "cache_over_forward": with_extraction / forward_seconds,
                }
                print(name, mode, json.dumps(result[f"{name}_{mode}"]), flush=True)
        # training consumption: the demo student's step at tp1 (sequences per second)
        trainer_config = load_config(
            args.config,
            [
                f"run.dir={tmp}/run",
                f"data.dir={base.data.dir}",
                "training.steps=4",
                "training.warmup_steps=1",
                "checkpoint.interval=1000",
                "parallel.tp=1",
                f"cache.dir={base.cache.dir}",
            ],
        )
        trainer = build_loop(trainer_config, ctx)  # the demo loss: RS-KD from this cache
        step_times = [trainer.train_step().seconds for _ in range(4)][1:]
        consumption = trainer_config.training.global_batch / statistics.median(step_times)
        shutdown()
    signal_dir = base.cache.dir
    if (signal_dir / "manifest.json").is_file():
        from distill.data.prepared import PreparedData

        data = PreparedData(base.data.dir)
        signal = CacheReader(
            signal_dir, prepared=data, tokenizer_sha256=data.tokenizer_sha256, vocab_size=vocab
        )
        rng = np.random.default_rng(0)
        keys = [(d, "train", int(rng.integers(data.num_sequences(d)))) for d in rng.choice(data.domains, 256)]
        started = time.perf_counter()
        for i in range(0, len(keys), 16):
            signal.batch(keys[i : i + 16])
        reader = len(keys) / (time.perf_counter() - started)
        result["reader"] = {
            "mode": signal.mode,
            "reader_sequences_per_s": reader,
            "training_sequences_per_s": consumption,
            "reader_over_training": reader / consumption,
        }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
