"""Mixture-of-experts teachers on megatron-core, in one launch of 4 ranks.

argv: OUT_DIR WORK_DIR. WORK_DIR holds `config.yaml` (prepared data, a cache section) and tiny random
`mixtral` and `qwen3_moe` models. Reported by rank 0:
- `logits`: per model and layout (tp, pp, ep) in (1,1,1), (1,1,2), (2,1,1), (2,1,2), (1,2,2), the max abs
  difference of the teacher's logits through distillery's frozen model (megatron-core MoE layers,
  all-gather token dispatcher, forward-only pipeline schedule) to plain `transformers` logits;
- caches of the qwen3_moe teacher (top-k) written at tp1 ep1, tp1 ep2 and tp2 ep2 under WORK_DIR
  (compared by the test).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distill.cache.writer import CacheWriter
from distill.config import load_config
from distill.data.prepared import PreparedData
from distill.engine import teacher_job
from distill.engine.megatron.forward import frozen_model
from parallel.distributed import init_parallel, shutdown
from tests.distributed import report

LAYOUTS = ((1, 1, 1), (1, 1, 2), (2, 1, 1), (2, 1, 2), (1, 2, 2))


def gathered(tp: int, group: object) -> Any:
    """A callback that applies the output layer and gathers the vocabulary shards (test only)."""

    def logits(index: int, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        local = torch.matmul(hidden, weight.t())  # [b, s, V/tp]
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    return logits


def main() -> None:
    out, work = sys.argv[1], Path(sys.argv[2])
    data = PreparedData(load_config(work / "config.yaml").data.dir)
    tokens = torch.from_numpy(data.store("code", "train").batch([0, 1])).long()  # [2, s + 1]
    found: dict[str, dict] = {"logits": {}, "caches": {}}
    from transformers import AutoModelForCausalLM

    for name in ("mixtral", "qwen3_moe"):
        reference = AutoModelForCausalLM.from_pretrained(str(work / name), dtype=torch.float32)
        with torch.no_grad():
            want = reference(input_ids=tokens[:, :-1]).logits
        for tp, pp, ep in LAYOUTS:
            ctx = init_parallel(tp, pp, seed=0, ep=ep)
            model = frozen_model(
                work / name,
                ctx,
                precision="fp32",
                tokenizer_sha256=data.tokenizer_sha256,
                data_dir=data.directory,
            )

            (ours,) = [x for x in model.forward([tokens], gathered(tp, ctx.tp_group)) if x is not None] or [
                None
            ]
            gap = float((ours - want).abs().max()) if ours is not None else -1.0
            gaps = [None] * dist.get_world_size()
            dist.all_gather_object(gaps, gap)
            found["logits"][f"{name}_tp{tp}pp{pp}ep{ep}"] = max(gaps)
    for tp, ep in ((1, 1), (1, 2), (2, 2)):
        directory = work / f"cache_tp{tp}ep{ep}"
        config = load_config(
            work / "config.yaml",
            [f"cache.dir={directory}", f"teacher.parallel.tp={tp}", f"teacher.parallel.ep={ep}"],
        )
        ctx = init_parallel(tp, 1, seed=0, ep=ep)
        CacheWriter(config, teacher_job(config, ctx), overwrite=False).run()
        dist.barrier()
        found["caches"][f"tp{tp}ep{ep}"] = str(directory)
    report(out, dist.get_rank(), found)
    shutdown()


if __name__ == "__main__":
    main()
