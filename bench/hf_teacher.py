"""A teacher megatron-core has no mapping for, run as a Hugging Face module: transformers' tensor
parallelism vs DeepSpeed ZeRO-3, side by side in one run, on 2 CPU ranks.

    .venv/bin/python bench/hf_teacher.py [--sequences 32] [--seq-len 256]

A random Gemma-3-style model (bench scale: hidden 512, 8 layers, a 32k vocabulary) is written once; then
each variant is launched on 2 gloo ranks (torchrun) and runs the cache stage's work over the same
sequences: the teacher's forward and the top-k (k = 64) extraction from its hidden states and output
weight, vocabulary-parallel where the vocabulary is split. Variants:
- `transformers_tp2`: one replica, the model sharded by transformers' tp plan (every rank runs every sequence);
- `zero3_dp2`: two replicas, the weights partitioned by ZeRO-3 and gathered layer by layer (each rank
  runs half of the sequences); its output weight is kept whole on each rank;
- `replicated_dp2`: the reference, each rank a whole copy (transformers at tp 1).
Reported per variant: parameter bytes a rank holds after loading, its peak resident memory, and tokens/s
of the whole job; and the ratios to the replicated reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, write_result

VARIANTS = ("transformers_tp2", "zero3_dp2", "replicated_dp2")


def write_model(out: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        sliding_window=128,
        max_position_embeddings=2048,
    )
    from distill.data.tokenizer import train_tokenizer
    from distill.tokenizer_files import copy_tokenizer_files
    from tests.helpers import stdlib_texts

    train_tokenizer(stdlib_texts(10), out.parent / "tokenizer", algorithm="byte_level_bpe", vocab_size=2000)
    transformers.Gemma3ForCausalLM(config).save_pretrained(out)
    copy_tokenizer_files(out.parent / "tokenizer", out)  # its ids a subset of the model's


def worker(model: Path, variant: str, sequences: int, seq_len: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from distill.cache import extract
    from distill.config import CampaignConfig
    from distill.data.tokenizer import load_tokenizer
    from distill.engine import teacher_job

    tp = 2 if variant == "transformers_tp2" else 1
    engine = "deepspeed" if variant == "zero3_dp2" else "transformers"
    config = CampaignConfig.model_validate(
        {
            "run": {"name": "bench", "dir": str(out)},
            "data": {
                "dir": str(out / "data"),
                "tokenizer": {"path": str(model)},
                "seq_len": 256,
                "domains": {"text": {"sources": [{"files": str(out / "none.txt")}]}},
            },
            "teacher": {"path": str(model), "micro_batch": 4, "engine": engine, "parallel": {"tp": tp}},
            "cache": {"dir": str(out / "cache")},
        }
    )
    job = teacher_job(config)
    sha = load_tokenizer(model).sha256
    forward: Any = job.frozen_model(model, precision="fp32", tokenizer_sha256=sha, data_dir=out)
    if hasattr(forward, "ds"):  # ZeRO-3: this rank's partition, and the output weight it keeps whole
        held = sum(p.ds_tensor.numel() * p.element_size() for p in forward.wrapper.model.parameters())
        held += forward.wrapper.weight.numel() * forward.wrapper.weight.element_size()
    else:  # transformers: this rank's shards (DTensor local parts) or its whole copy
        held = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
            for p in forward.model.parameters()
        )
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32768, (sequences, seq_len + 1), generator=generator)
    mine = tokens[job.dp_rank :: job.dp_size]
    micro = list(mine.split(4))

    def extract_signal(index: int, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
        flat = extract.ChunkedLogits(hidden.reshape(-1, hidden.shape[-1]), weight)
        extract.topk_with_tail(
            flat,
            64,
            temperature=1.0,
            target=labels.reshape(-1),
            vocab_start=forward.shard.start,
            group=forward.shard.group,
        )

    forward.forward(micro[:1], extract_signal)  # warm-up
    dist.barrier()
    start = time.perf_counter()
    forward.forward(micro, extract_signal)
    dist.barrier()
    seconds = time.perf_counter() - start
    measured = (
        sum(m.shape[0] for m in micro) * seq_len * job.dp_size
    )  # every replica's share, warm-up excluded
    result = {
        "held_param_bytes": held,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": seconds,
        "tokens_per_s": measured / seconds,
    }
    (out / f"{variant}_rank{dist.get_rank()}.json").write_text(json.dumps(result))
    job.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "hf_teacher.json"))
    parser.add_argument(
        "--worker", nargs=4, metavar=("MODEL", "VARIANT", "SEQUENCES", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        model, variant, sequences, out = args.worker
        worker(Path(model), variant, int(sequences), args.seq_len, Path(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "gemma3"
        write_model(model)
        (Path(tmp) / "out").mkdir()
        results = {}
        for variant in VARIANTS:
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node=2",
                    __file__,
                    "--seq-len",
                    str(args.seq_len),
                    "--worker",
                    str(model),
                    variant,
                    str(args.sequences),
                    str(Path(tmp) / "out"),
                ],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-5000:]}")
            ranks = [
                json.loads((Path(tmp) / "out" / f"{variant}_rank{r}.json").read_text()) for r in range(2)
            ]
            results[variant] = {
                "held_param_MB_per_rank": round(max(r["held_param_bytes"] for r in ranks) / 2**20, 1),
                "peak_rss_MB_per_rank": round(max(r["peak_rss_bytes"] for r in ranks) / 2**20, 1),
                "tokens_per_s": round(min(r["tokens_per_s"] for r in ranks), 1),
            }
        reference = results["replicated_dp2"]
        for found in results.values():
            found["params_vs_replicated"] = round(
                found["held_param_MB_per_rank"] / reference["held_param_MB_per_rank"], 3
            )
            found["tokens_per_s_vs_replicated"] = round(found["tokens_per_s"] / reference["tokens_per_s"], 3)
    write_result(
        args.out,
        {
            "model": "random Gemma-3-style, hidden 512, 8 layers, vocabulary 32768",
            "ranks": 2,
            "sequences": args.sequences,
            "seq_len": args.seq_len,
            "top_k": 64,
            "variants": results,
        },
    )


if __name__ == "__main__":
    main()
