"""A ~1B-parameter student at seq 2048 on one device: cache write throughput of a ~1B teacher, and the
training step (time, tokens/s, model TFLOP/s, MFU, peak memory) with CE, cached KD and online KD.

    python bench/scale.py [--size 1b|tiny] [--engine megatron|deepspeed] [--steps 7] [--warmup 2] \
        [--work DIR] [--out bench/results/scale_megatron.json]

Everything is synthetic and made here, so it runs on a machine with no model or data set: a word-level
tokenizer of Llama 3's vocabulary size (128,256 ids), documents of ids drawn from a Zipf law (prepared
by the real `prepare` stage), and a random Llama-3.2-1B-shaped teacher (h 2048, 16 layers, ffn 8192,
32 heads, 8 key/value heads, tied embeddings: 1.24B parameters; bf16, initialised by transformers). The student starts from the teacher's weights (its losses are not the point here; its FLOPs
and memory are those of any 1B student). Cache: top-k 64 (what configs/cluster_8b_to_1b.yaml uses), timed
as the cache stage's writer runs it (teacher forward + extraction + encode + write), beside the teacher
forward alone over the same micro-batches. Training: `training.global_batch` 16 sequences of 2048 in
micro-batches of 4, bf16 with fp32 master weights; each variant in a world of its own in this process,
median over the steps after `--warmup`. `--size tiny` is the same on a 2-core CPU (the CI rehearsal).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from common import REPO, write_result

SIZES = {
    # the student = teacher shape; seq_len, sequences prepared, global / micro batch, vocabulary
    "1b": {
        "arch": {
            "hidden_size": 2048,
            "num_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "ffn_hidden_size": 8192,
        },
        "seq_len": 2048,
        "sequences": 96,
        "global_batch": 16,
        "micro_batch": 4,
        "vocab": 128256,
        "teacher_micro_batch": 8,
    },
    "tiny": {
        "arch": {
            "hidden_size": 64,
            "num_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "ffn_hidden_size": 128,
        },
        "seq_len": 64,
        "sequences": 24,
        "global_batch": 4,
        "micro_batch": 2,
        "vocab": 1024,
        "teacher_micro_batch": 4,
    },
}


def write_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer: `<eos>`, `<unk>`, then words `w2` ... `w{vocab-1}` (split on whitespace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        out
    )


def write_corpus(out: Path, vocab: int, tokens: int, seq_len: int) -> None:
    """Documents of seq_len / 4 to 1.5 seq_len words with ids from a Zipf law (language-like)."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "docs.jsonl", "w") as f:
        written = 0
        while written < tokens:
            length = int(rng.integers(seq_len // 4, seq_len * 3 // 2))
            ids = np.minimum(rng.zipf(1.2, length) + 1, vocab - 1)
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n")
            written += length


def write_teacher(arch, out: Path, tokenizer_dir: Path) -> None:
    """A random HF model of `arch` in bf16, initialised by transformers on the GPU when there is one (a
    1B model's init on the CPU takes longer than the whole benchmark's training)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.models.hf_io import generation_config, write_hf_directory

    torch.manual_seed(7)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**arch.to_hf_config()), dtype=torch.bfloat16
        )
    state = {
        k: v.cpu()
        for k, v in model.state_dict().items()
        if not (arch.tie_word_embeddings and k == "lm_head.weight")
    }
    del model
    generation = generation_config(tokenizer_dir)
    write_hf_directory(
        out, state, arch, tokenizer_dir=tokenizer_dir, dtype=torch.bfloat16, generation=generation
    )


def campaign(work: Path, size: dict, engine: str, variant: str, steps: int) -> dict:
    """The config tree of one variant (`ce`, `cached_kd`, `online_kd`)."""
    teacher = work / "teacher"
    tree = {
        "run": {"name": f"scale-{variant}", "dir": str(work / "runs" / f"{engine}-{variant}")},
        "data": {
            "tokenizer": {"path": str(work / "tokenizer")},
            "seq_len": size["seq_len"],
            "heldout_sequences": 2,
            "heldout_fraction": 0.1,
            "dir": str(work / "prepared"),
            "workers": 4,
            "domains": {"synthetic": {"sources": [{"files": str(work / "corpus" / "*.jsonl")}]}},
        },
        "teacher": {
            "path": str(teacher),
            "micro_batch": size["teacher_micro_batch"],
            "mode": "online" if variant == "online_kd" else "cached",
        },
        "cache": {"dir": str(work / "cache"), "mode": "topk", "k": 64, "sequences_per_shard": 32},
        "loss": {"weights": {"ce": 1.0} if variant == "ce" else {"ce": 0.0, "forward_kl": 1.0}},
        "student": {"init": str(teacher)},
        "parallel": {"tp": 1, "pp": 1},
        "training": {
            "steps": steps,
            "global_batch": size["global_batch"],
            "micro_batch": size["micro_batch"],
            "lr": 1e-4,
            "warmup_steps": 1,
            "log_interval": 1_000_000,
            "eval_sequences": 0,
            "seed": 1234,
        },
        "checkpoint": {
            "dir": str(work / "runs" / f"{engine}-{variant}" / "checkpoints"),
            "interval": 1_000_000,
        },
        "logging": {"metrics": str(work / "runs" / f"{engine}-{variant}" / "metrics.jsonl")},
    }
    if variant == "online_kd":
        del tree["cache"]
    if engine == "deepspeed":
        tree.update(engine="deepspeed", deepspeed={"zero_stage": 2})
    return tree


def load(tree: dict, work: Path, name: str):
    from distill.config import load_config

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_config(path)


def build_inputs(work: Path, size: dict) -> None:
    """Tokenizer, corpus, the random teacher and the prepared data (each kept if already there)."""
    from distill.data.prepare.run import prepare
    from parallel.model import ModelArch

    if not (work / "tokenizer" / "tokenizer.json").is_file():
        write_tokenizer(work / "tokenizer", size["vocab"])
    if not (work / "corpus" / "docs.jsonl").is_file():
        write_corpus(
            work / "corpus",
            size["vocab"],
            int(size["sequences"] * (size["seq_len"] + 1) * 1.2),
            size["seq_len"],
        )
    if not (work / "teacher" / "config.json").is_file():
        started = time.perf_counter()
        arch = ModelArch(
            model_type="llama",
            vocab_size=size["vocab"],
            head_dim=size["arch"]["hidden_size"] // size["arch"]["num_attention_heads"],
            max_position_embeddings=max(4096, size["seq_len"]),
            rope_theta=500000.0,
            tie_word_embeddings=True,
            **size["arch"],
        )
        write_teacher(arch, work / "teacher", work / "tokenizer")
        print(
            f"scale: random teacher ({arch.num_parameters() / 1e9:.2f}B) written in "
            f"{time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    prepare(load(campaign(work, size, "megatron", "ce", 10), work, "prepare"), progress=False)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cache_throughput(work: Path, size: dict) -> dict:
    """Cache stage writer (teacher forward + top-k extraction + encode + write) vs the forward alone."""
    from distill.cache.writer import CacheWriter
    from distill.engine import teacher_job
    from parallel.distributed import init_parallel, shutdown

    config = load(campaign(work, size, "megatron", "cached_kd", 10), work, "cache")
    ctx = init_parallel(1, 1, seed=0)
    try:
        started = time.perf_counter()
        writer = CacheWriter(config, teacher_job(config, ctx), overwrite=True)
        load_seconds = time.perf_counter() - started
        data = writer.data
        positions = (
            sum(data.num_sequences(d, s) for d in data.domains for s in ("train", "heldout")) * data.seq_len
        )
        _sync()
        started = time.perf_counter()
        writer.run()
        _sync()
        write_seconds = time.perf_counter() - started
        tokens = torch.from_numpy(
            data.store(data.domains[0], "train").batch(np.arange(data.num_sequences(data.domains[0])))
        )
        micro = list(tokens.to(ctx.device).split(size["teacher_micro_batch"]))
        writer.model.forward(micro[:1], lambda i, h, w, labels: torch.matmul(h, w.t()))  # warm
        _sync()
        started = time.perf_counter()
        writer.model.forward(micro, lambda i, h, w, labels: torch.matmul(h, w.t()))  # forward + output layer
        _sync()
        forward_seconds = time.perf_counter() - started
        forward_tokens = sum(len(m) for m in micro) * data.seq_len
        manifest = json.loads((work / "cache" / "manifest.json").read_text())
    finally:
        writer = None
        shutdown()
        _release()
    return {
        "teacher_load_seconds": load_seconds,
        "positions": positions,
        "write_seconds": write_seconds,
        "write_tokens_per_s": positions / write_seconds,
        "forward_only_tokens_per_s": forward_tokens / forward_seconds,
        "ratio_write_over_forward_time": (write_seconds / positions) / (forward_seconds / forward_tokens),
        "bytes_per_token": manifest["bytes_per_token"],
        "mode": "topk k=64",
    }


def train_variant(work: Path, size: dict, engine: str, variant: str, steps: int, warmup: int) -> dict:
    from distill.training.train import build_loop
    from parallel.distributed import shutdown

    config = load(campaign(work, size, engine, variant, steps), work, f"{engine}-{variant}")
    shutil.rmtree(config.run.dir, ignore_errors=True)
    ctx = None
    if engine == "megatron":
        from parallel.distributed import init_parallel

        ctx = init_parallel(1, 1, seed=config.training.seed)
    started = time.perf_counter()
    trainer = build_loop(config, ctx)
    build_seconds = time.perf_counter() - started
    try:
        _release()
        results = [trainer.train_step() for _ in range(steps)]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        timed = results[warmup:]
        step_s = statistics.median(r.seconds for r in timed)
        achieved = trainer.step_log.tflops_per_device(step_s)
        peak_tflops = trainer.step_log.peak_tflops
        phases = {k: statistics.median(r.phases.get(k, 0.0) for r in timed) for k in timed[-1].phases}
        out = {
            "build_seconds": build_seconds,
            "step_seconds": step_s,
            "tokens_per_s": timed[-1].tokens / step_s,
            "model_tflops_per_device": achieved,
            "mfu": achieved / peak_tflops if peak_tflops else None,
            "peak_gib": peak,
            "phases_seconds": phases,
            "losses": [r.loss for r in results],
            "description": getattr(trainer.engine, "description", engine),
        }
    finally:
        trainer.close()
        trainer.engine.close() if engine == "deepspeed" else shutdown()
        trainer = None
        _release()
    print(
        f"scale: {engine} {variant}: {out['step_seconds']:.3f} s/step, {out['tokens_per_s']:,.0f} tok/s, "
        f"{achieved:.1f} TFLOP/s" + (f", MFU {out['mfu']:.1%}" if out["mfu"] else ""),
        file=sys.stderr,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--engine", choices=["megatron", "deepspeed"], default="megatron")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="ce,cached_kd,online_kd")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_scale")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    size = SIZES[args.size]
    work = args.work.resolve() / args.size
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build_inputs(work, size)
    result: dict = {
        "size": args.size,
        "engine": args.engine,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "seq_len": size["seq_len"],
        "global_batch": size["global_batch"],
        "micro_batch": size["micro_batch"],
        "vocab": size["vocab"],
        "inputs_seconds": time.perf_counter() - started,
    }
    from distill.models.weights import find_weights

    arch = find_weights(work / "teacher").arch
    result["parameters"] = arch.num_parameters()
    if args.engine == "megatron":
        result["cache"] = cache_throughput(work, size)
    elif not (work / "cache" / "manifest.json").is_file():
        result["cache"] = cache_throughput(work, size)
    variants = {}
    for variant in args.variants.split(","):
        variants[variant] = train_variant(work, size, args.engine, variant, args.steps, args.warmup)
    result["variants"] = variants
    if "ce" in variants:
        for other in ("cached_kd", "online_kd"):
            if other in variants:
                result[f"ratio_{other}_over_ce_step"] = (
                    variants[other]["step_seconds"] / variants["ce"]["step_seconds"]
                )
    write_result(args.out or str(REPO / "bench" / "results" / f"scale_{args.engine}.json"), result)


if __name__ == "__main__":
    main()
