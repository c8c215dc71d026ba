"""Which prepared sequences form global batch `step`: a pure function of (seed, step).

All domains' training sequences form one index space, shuffled with a seeded permutation per epoch;
global batch k is the k-th run of `global_batch` positions in that stream. Nothing but the step needs
saving, so a resumed run reads exactly the batches the uninterrupted run would, at any layout. Each
data-parallel rank takes a contiguous slice of the global batch; their union is the dp=1 batch.
(The domain-mixture sampler of the DDK issue replaces this with weighted, per-domain streams.)
"""

from __future__ import annotations

import numpy as np

from distill.data.prepared import PreparedData


class GlobalBatches:
    def __init__(self, data: PreparedData, global_batch: int, seed: int) -> None:
        self.data = data
        self.global_batch = global_batch
        self.seed = seed
        counts = [data.num_sequences(d) for d in data.domains]
        self.offsets = np.cumsum([0, *counts])  # [domains + 1]
        self.total = int(self.offsets[-1])
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))  # (epoch, permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        # one tuple, replaced whole: the cache reader's prefetch thread calls this too
        cached = self._cached
        if cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.total))
            self._cached = cached
        return cached[1]

    def global_ids(self, step: int) -> np.ndarray:
        """`[global_batch]` ids into the concatenated training sequences of all domains."""
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        return np.array([self._permutation(int(p // self.total))[p % self.total] for p in positions])

    def rows(self, step: int, dp_rank: int, dp: int) -> list[tuple[str, int]]:
        """This rank's slice of batch `step` as (domain, training-sequence index) pairs."""
        per_rank = self.global_batch // dp
        ids = self.global_ids(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        domains = np.searchsorted(self.offsets, ids, side="right") - 1
        return [(self.data.domains[d], int(i - self.offsets[d])) for d, i in zip(domains, ids, strict=True)]

    def tokens(self, rows: list[tuple[str, int]]) -> np.ndarray:
        """The sequences of `rows`: `[len(rows), seq_len + 1]` int64."""
        return np.stack([self.data.sequence(domain, index) for domain, index in rows])
