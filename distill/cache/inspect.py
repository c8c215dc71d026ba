"""`distillery cache inspect DIR`: what a cache holds and how faithful it is.

Reports bytes per token (and vs a float16 dense row), the kept probability mass (top-k) or the mean
number of distinct ids (sampled), the teacher's per-domain held-out perplexity read from the stored
target log-probabilities, and, on a few sequences, how far the reconstruction is from the dense
teacher: KL(p || p_hat) for top-k (tail spread uniformly over the unkept ids, as the losses complete
it) and total variation |p - p_hat|_1 / 2 for sampled (its KL is infinite where no draw landed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.cache.reader import CacheReader, read_cache_manifest
from distill.data.prepared import PreparedData


def _dense_teacher_logprobs(
    manifest: dict[str, Any], data: PreparedData, tokens: torch.Tensor
) -> torch.Tensor:
    """Teacher log-probs `[b, s, V]` in one process (a teacher job of one rank, fp32): megatron-core if the
    cache was written by it, else the teacher's HF module as `transformers` runs it."""
    from distill.config.train import ParallelConfig

    job: Any
    if manifest["teacher"].get("engine", "megatron") == "megatron":
        from distill.engine.megatron.teacher import MegatronTeacherJob

        job = MegatronTeacherJob(ParallelConfig(tp=1, pp=1))
    else:
        from distill.engine.hf.teacher import TransformersTeacherJob

        job = TransformersTeacherJob(ParallelConfig(tp=1, pp=1))
    try:
        model = job.frozen_model(
            Path(manifest["teacher"]["path"]),
            precision="fp32",
            tokenizer_sha256=manifest["spec"]["tokenizer_sha256"],  # the tokenizer the cache was written in
            data_dir=data.directory,
        )
        temperature = manifest["spec"].get("temperature", 1.0)
        (logprobs,) = model.forward(
            [tokens],
            lambda index, hidden, weight, labels: torch.log_softmax(
                torch.matmul(hidden, weight.t()).float() / temperature, dim=-1
            ),
        )
        return logprobs
    finally:
        job.close()


def inspect_cache(directory: Path, *, sequences: int = 8) -> dict[str, Any]:
    manifest = read_cache_manifest(directory)
    spec = manifest["spec"]
    prepared = PreparedData(Path(manifest["prepared"]["dir"]))
    vocab = spec["teacher_vocab_size"]
    signal = CacheReader(
        directory, prepared=prepared, tokenizer_sha256=spec["tokenizer_sha256"], vocab_size=vocab
    )
    report: dict[str, Any] = {
        "mode": spec["mode"],
        "positions": manifest["positions"],
        "bytes_per_token": round(manifest["bytes_per_token"], 2),
        "dense_fp16_bytes_per_token": 2 * vocab,
        "compression_vs_dense_fp16": round(2 * vocab / manifest["bytes_per_token"], 1),
        "teacher_heldout_perplexity": {},
    }
    for domain in prepared.domains:
        n = prepared.num_sequences(domain, "heldout")
        targets = np.concatenate(
            [signal.sequence((domain, "heldout", i))["target_logprob"] for i in range(n)]
        )
        report["teacher_heldout_perplexity"][domain] = round(math.exp(-targets.mean()), 3)
    keys = [
        (domain, "train", i)
        for domain in prepared.domains
        for i in range(max(1, sequences // len(prepared.domains)))
    ]
    batch = signal.batch(keys)
    dense = _dense_teacher_logprobs(
        manifest, prepared, torch.stack([torch.from_numpy(prepared.sequence(d, i)) for d, _, i in keys])
    )
    p = dense.exp()[..., :vocab].double()  # [b, s, V]
    if signal.mode == "topk":
        report["mean_kept_mass"] = round(float(1 - batch["tail"].mean()), 4)
        k = batch["ids"].shape[-1]
        p_hat = (batch["tail"] / max(1, vocab - k)).unsqueeze(-1).expand_as(p).clone().double()
        p_hat.scatter_(-1, batch["ids"], batch["logprobs"].double().exp())
        kl = (p * (p.clamp_min(1e-30).log() - p_hat.clamp_min(1e-30).log())).sum(-1)
        report["kl_dense_to_reconstruction"] = {"mean": float(kl.mean()), "max": float(kl.max())}
    else:
        weights = batch["weights"].double()
        report["mean_distinct_ids"] = round(float((batch["ids"] >= 0).sum(-1).double().mean()), 2)
        p_hat = torch.zeros_like(p)
        p_hat.scatter_add_(-1, batch["ids"].clamp_min(0), weights)
        tv = 0.5 * (p - p_hat).abs().sum(-1)
        report["total_variation_dense_to_samples"] = {"mean": float(tv.mean()), "max": float(tv.max())}
    report["sequences_compared"] = len(keys)
    return report
