"""Held-out cross-entropy of the student per domain, computed by the whole job.

The first `sequences` held-out sequences of each domain are split over the data-parallel ranks
(`rank, rank + dp, ...`) and run forward-only through the pipeline schedule with the fused CE; the
last stage's sums are reduced over all ranks, so every rank gets the same numbers. Used for the
metrics of a run (perplexity per domain) and, later, by DDK's domain reweighting.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distill.data.prepared import PreparedData
from distill.training.objective import Objective
from parallel.distributed import ParallelContext
from parallel.schedule import run_schedule


def heldout_cross_entropy(
    model: torch.nn.Module,
    forward_step: Any,
    ce: Objective,
    data: PreparedData,
    ctx: ParallelContext,
    *,
    sequences: int,
    micro_batch: int,
) -> dict[str, float]:
    """Mean next-token CE (nats) per domain over its first `sequences` held-out sequences.

    `forward_step(batch, model, objective)` is the trainer's; `ce` a CE-only objective."""
    sums = torch.zeros(len(data.domains), 2, dtype=torch.float64, device=ctx.device)  # [domain, (ce, tokens)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for d, domain in enumerate(data.domains):
            count = min(sequences, data.num_sequences(domain, "heldout"))
            mine = np.arange(ctx.dp_rank, count, ctx.dims.dp)
            if not len(mine):
                continue
            tokens = torch.from_numpy(data.store(domain, "heldout").batch(mine)).to(ctx.device)
            micro = list(tokens.split(micro_batch))
            for size in sorted({len(m) for m in micro}, reverse=True):  # the pipeline needs equal sizes
                group = [m for m in micro if len(m) == size]
                reports = run_schedule(
                    model,
                    group,
                    lambda batch, module: forward_step(batch, module, ce),
                    seq_length=data.seq_len,
                    micro_batch_size=size,
                    forward_only=True,
                )
                if ctx.is_last_stage and ctx.tp_rank == 0:
                    for r in reports:
                        sums[d, 0] += float(r["ce"])
                        sums[d, 1] += float(r["tokens"])
    model.train(was_training)
    dist.all_reduce(sums)
    return {domain: float(sums[d, 0] / sums[d, 1]) for d, domain in enumerate(data.domains) if sums[d, 1] > 0}
