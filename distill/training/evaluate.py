"""Held-out cross-entropy per domain of any scorer (the student, or a teacher source), by the whole job.

The first `sequences` held-out sequences of each domain are split over the data-parallel replicas
(`rank, rank + dp, ...`) into micro-batches, the same number of them on every replica; `score(micro_batches)` gives each one's summed CE and
token count on the ranks that compute losses; the counting ranks' sums are reduced over all ranks, so
every rank gets the same numbers. The student scores through its engine's forward-only pass, a teacher
source through `cross_entropy` (the cache's stored target log-probs, or the live teacher's pass).
Used for the run's held-out perplexity metrics and by DDK's domain reweighting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from distill.data.prepared import PreparedData
from distill.engine.base import Engine
from distill.teacher.source import MicroBatch

Scorer = Callable[[list[MicroBatch]], list[tuple[float, int] | None]]


def heldout_cross_entropy(
    score: Scorer,
    data: PreparedData,
    engine: Engine,
    *,
    sequences: int,
    micro_batch: int,
    check_stop: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Mean next-token CE (nats) per domain over its first `sequences` held-out sequences.
    `check_stop` (collective) runs before each domain's passes: a stop request ends the evaluation
    there (it raises `StopRequested`), on every rank at the same point."""
    sums = torch.zeros(
        len(data.domains), 2, dtype=torch.float64, device=engine.device
    )  # [domain, (ce, tokens)]
    for d, domain in enumerate(data.domains):
        if check_stop is not None:
            check_stop()
        count = min(sequences, data.num_sequences(domain, "heldout"))
        if not count:
            continue
        mine = np.arange(engine.dp_rank, count, engine.dp_size)
        # Every replica runs the same number of forward passes (a ZeRO-3 forward is collective): one
        # with fewer sequences adds a padding micro-batch (a sequence of its domain) and drops its result.
        passes = math.ceil(math.ceil(count / engine.dp_size) / micro_batch)
        chunks = [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
        counted = len(chunks)
        chunks += [np.zeros(1, dtype=np.int64)] * (passes - counted)
        store = data.store(domain, "heldout")
        micro = [
            MicroBatch(
                [(domain, "heldout", int(i)) for i in chunk],
                torch.from_numpy(store.batch(chunk)).to(engine.device),  # [mb, s + 1]
            )
            for chunk in chunks
        ]
        results = score(micro)
        if engine.counting_rank:
            for result in results[:counted]:
                assert result is not None
                sums[d, 0] += result[0]
                sums[d, 1] += result[1]
    engine.all_reduce_sum(sums)
    return {domain: float(sums[d, 0] / sums[d, 1]) for d, domain in enumerate(data.domains) if sums[d, 1] > 0}
