"""Teachers as Hugging Face modules (the HF path, `distill/engine/hf/`), in one launch of 1 or 2 ranks.

argv: OUT_DIR WORK_DIR. WORK_DIR holds `config.yaml` (prepared data, a Llama teacher, a cache section)
and tiny random models megatron-core has no mapping for: `gemma3` (vocabulary 640), `olmo2`, `granite`
(logits scaled after the output layer) and `gemma3_262k` (a 262,144-entry vocabulary over the same small
tokenizer). Per rank, reported:
- `logits`: for gemma3 and olmo2 under each teacher job this world allows (one rank: transformers tp1;
  two ranks: transformers tp2 and DeepSpeed ZeRO-3 dp2), the max abs difference of the teacher's logits
  through distillery's forward (hidden states x this rank's output-weight rows, gathered over the
  vocabulary shards) to plain `transformers` logits of the same model on this rank;
- caches written under WORK_DIR/<world>_<job>/<name> (compared by the test): gemma3 top-k and sampled,
  olmo2 top-k, the 262k teacher top-k and sampled; at one rank also the Llama teacher under megatron-core
  and under transformers (the cross-check), at two ranks gemma3 top-k under ZeRO-3 too;
- `refused`: the error the HF path gives the granite teacher;
- at two ranks, `fused_262k`: the fused KD loss of a student with the 262k vocabulary against that
  cache (top-k and sampled) at tp2 (vocabulary split, never gathered) against tp1 on each rank: the
  relative difference of the loss and the max abs difference of the gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distill.cache.reader import CacheReader
from distill.cache.writer import CacheWriter
from distill.config import load_config
from distill.data.prepared import PreparedData
from distill.engine import teacher_job
from distill.errors import DataError
from parallel.distributed import join_world
from parallel.vocab import VocabShard
from tests.distributed import report

CACHES = (  # name, model directory (None: config's Llama), mode, teacher.engine
    ("gemma3_topk", "gemma3", "topk", "auto"),
    ("gemma3_sampled", "gemma3", "sampled", "auto"),
    ("olmo2_topk", "olmo2", "topk", "auto"),
    ("big_topk", "gemma3_262k", "topk", "auto"),
    ("big_sampled", "gemma3_262k", "sampled", "auto"),
)
LLAMA = (  # one rank: the megatron / HF cross-check of one Llama teacher
    ("llama_megatron_topk", None, "topk", "megatron"),
    ("llama_hf_topk", None, "topk", "transformers"),
    ("llama_megatron_sampled", None, "sampled", "megatron"),
    ("llama_hf_sampled", None, "sampled", "transformers"),
)


def config_for(work: Path, model: str | None, *overrides: str) -> Any:
    teacher = [f"teacher.path={work / model}"] if model else []
    return load_config(work / "config.yaml", [*teacher, *overrides])


def full_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher logits `[b, s, V]` through the seam, the vocabulary shards gathered (test only)."""

    def logits(index: int, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        local = torch.matmul(hidden, weight.t())  # [b, s, V/tp]
        group = model.shard.group
        if group is None or dist.get_world_size(group) == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    (out,) = model.forward([tokens], logits)
    return out


def reference_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        return model(input_ids=tokens[:, :-1]).logits


def logits_gap(work: Path, model_dir: str, job_overrides: list[str], tokens: torch.Tensor) -> float:
    config = config_for(work, model_dir, *job_overrides)
    data = PreparedData(config.data.dir)
    job = teacher_job(config)
    try:
        model = job.frozen_model(
            work / model_dir,
            precision="fp32",
            tokenizer_sha256=data.tokenizer_sha256,
            data_dir=data.directory,
        )
        ours = full_logits(model, tokens)
        return float((ours - reference_logits(work / model_dir, tokens)).abs().max())
    finally:
        job.close()


def write_cache(work: Path, out: Path, model: str | None, mode: str, overrides: list[str]) -> None:
    config = config_for(work, model, f"cache.dir={out}", f"cache.mode={mode}", *overrides)
    job = teacher_job(config)
    try:
        CacheWriter(config, job, overwrite=False).run()
    finally:
        job.close()


def fused_262k(work: Path, cache: Path, rank: int) -> dict[str, float]:
    """The fused KD loss of a 262k-vocabulary student against `cache` at tp2 vs tp1 (on this rank)."""
    from distill.losses.fused import Terms, fused_output_loss
    from distill.losses.signal import signal_from_cache_rows

    data = PreparedData(config_for(work, None).data.dir)
    reader = CacheReader(cache, prepared=data, tokenizer_sha256=data.tokenizer_sha256, vocab_size=262_144)
    domain = data.domains[0]
    rows = reader.batch([(domain, "train", 0), (domain, "train", 1)])
    vocab, width = 262_144, 32
    generator = torch.Generator().manual_seed(7)
    tokens = rows["target_logprob"].numel()  # positions of the two sequences
    hidden = torch.randn(tokens, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.5
    labels = torch.randint(0, 600, (tokens,), generator=generator)
    terms = Terms({"ce": 0.5, "forward_kl": 1.0}, temperature=2.0)
    results = {}
    for tp, shard in (
        (1, VocabShard(0, vocab, None)),
        (2, VocabShard.of(vocab, rank, 2, dist.group.WORLD)),
    ):
        sl = slice(shard.start, shard.start + shard.size)
        h, w = hidden.clone().requires_grad_(), weight[sl].clone().requires_grad_()
        teacher = signal_from_cache_rows(rows, vocab, torch.device("cpu"))
        loss, _ = fused_output_loss(h, w, labels, terms=terms, shard=shard, teacher=teacher)
        grad_h, grad_w = torch.autograd.grad(loss, [h, w])
        results[tp] = (loss.detach(), grad_h, grad_w, sl)
    loss1, gh1, gw1, _ = results[1]
    loss2, gh2, gw2, sl2 = results[2]
    return {
        "loss": float(loss1),
        "loss_rel_diff": float((loss2 - loss1).abs() / loss1.abs()),
        "grad_hidden_max_diff": float((gh2 - gh1).abs().max()),
        "grad_weight_max_diff": float((gw2 - gw1[sl2]).abs().max()),
        "grad_scale": float(gh1.abs().max()),
    }


def main() -> None:
    out, work = sys.argv[1], Path(sys.argv[2])
    join_world()
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = torch.from_numpy(
        PreparedData(config_for(work, None).data.dir).store("code", "train").batch([0, 1])
    ).long()  # [2, s + 1]
    found: dict[str, Any] = {"logits": {}, "caches": {}}
    jobs = (
        {"tp1": ["teacher.engine=transformers"]}
        if world == 1
        else {
            "tp2": ["teacher.engine=transformers", "teacher.parallel.tp=2"],
            "zero3": ["teacher.engine=deepspeed"],
        }
    )
    for model_dir in ("gemma3", "olmo2"):
        for job_name, overrides in jobs.items():
            found["logits"][f"{model_dir}_{job_name}"] = logits_gap(work, model_dir, overrides, tokens)
    layout = ["teacher.parallel.tp=2"] if world == 2 else []
    for name, model, mode, engine in CACHES + (LLAMA if world == 1 else ()):
        directory = work / f"{'one' if world == 1 else 'two'}_{'tp2' if world == 2 else 'tp1'}" / name
        write_cache(work, directory, model, mode, [f"teacher.engine={engine}", *layout])
        found["caches"][name] = str(directory)
    if world == 2:
        zero = work / "two_zero3" / "gemma3_topk"
        write_cache(work, zero, "gemma3", "topk", ["teacher.engine=deepspeed"])
        found["caches"]["zero3_gemma3_topk"] = str(zero)
        found["fused_262k"] = {
            mode: fused_262k(work, work / "one_tp1" / f"big_{mode}", rank) for mode in ("topk", "sampled")
        }
    else:
        job = teacher_job(config_for(work, "granite"))
        try:
            data = PreparedData(config_for(work, None).data.dir)
            job.frozen_model(
                work / "granite",
                precision="fp32",
                tokenizer_sha256=data.tokenizer_sha256,
                data_dir=data.directory,
            )
            found["refused"] = None
        except DataError as exc:
            found["refused"] = str(exc)
        finally:
            job.close()
    report(out, rank, found)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
