"""The domain mixture sampler: which prepared training sequences form each global batch.

Each sample first picks a domain, then the next sequence of that domain:

- **Domain choice** is greedy and error-minimising, as in Megatron's blended datasets: sample n goes to
  the domain whose count lags its target share the most, `argmax_i (w_i (n + 1) - count_i)`, counting
  since the weights were last set. So after n samples every domain's share is within about 1/n of its
  weight, and unlike independent random draws there is no sampling noise to average out.
- **Within a domain** sequences are read in a seeded shuffled order without repetition; when a domain is
  exhausted its next epoch starts with a new order (`rng([seed, domain, epoch])`).

A global batch is the next `global_batch` samples; data-parallel rank r takes the r-th contiguous
slice, so the ranks' samples are disjoint and their union is exactly the dp=1 batch. Everything that
determines the next sample (weights, per-domain cursor and epoch, counts since the weights were set)
is in `state_dict`, saved with every checkpoint: a resumed run draws exactly the samples the
uninterrupted run would have drawn. There is no other random state: the orders are pure functions of
(seed, domain, epoch).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from distill.errors import DataError

Row = tuple[str, int]  # (domain, index of a training sequence)


class MixtureSampler:
    def __init__(self, sizes: dict[str, int], weights: dict[str, float], seed: int) -> None:
        self.domains = list(sizes)
        self.sizes = np.array([sizes[d] for d in self.domains], dtype=np.int64)
        self.seed = seed
        self.cursor = np.zeros(len(self.domains), dtype=np.int64)  # next position in the domain's order
        self.epoch = np.zeros(len(self.domains), dtype=np.int64)
        self.counts = np.zeros(len(self.domains), dtype=np.int64)  # samples since the weights were set
        self.drawn = 0
        self.weights = np.zeros(len(self.domains))
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self.set_weights(weights)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Start drawing with new weights (normalised); the greedy counts restart."""
        if set(weights) != set(self.domains):
            raise DataError(f"mixture weights name {sorted(weights)}, the data has domains {self.domains}")
        raw = np.array([float(weights[d]) for d in self.domains])
        if not np.isfinite(raw).all() or (raw < 0).any() or raw.sum() <= 0:
            raise DataError(f"mixture weights must be finite, >= 0, with a positive sum, got {weights}")
        empty = [d for d, w, n in zip(self.domains, raw, self.sizes, strict=True) if w > 0 and n == 0]
        if empty:
            raise DataError(f"domains {empty} have weight but no training sequences")
        self.weights = raw / raw.sum()
        self.counts[:] = 0

    def sizes_dict(self) -> dict[str, int]:
        return {d: int(n) for d, n in zip(self.domains, self.sizes, strict=True)}

    def weights_dict(self) -> dict[str, float]:
        return {d: float(w) for d, w in zip(self.domains, self.weights, strict=True)}

    def _order(self, domain: int, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self.domains):  # keep only recent epochs
                self._orders.clear()
            self._orders[key] = np.random.default_rng([self.seed, domain, epoch]).permutation(
                self.sizes[domain]
            )
        return self._orders[key]

    def draw(self, n: int) -> list[Row]:
        """The next `n` samples (advances the state)."""
        rows: list[Row] = []
        for _ in range(n):
            d = int(np.argmax(self.weights * (self.counts.sum() + 1) - self.counts))
            rows.append((self.domains[d], int(self._order(d, int(self.epoch[d]))[self.cursor[d]])))
            self.counts[d] += 1
            self.cursor[d] += 1
            if self.cursor[d] == self.sizes[d]:
                self.cursor[d] = 0
                self.epoch[d] += 1
        self.drawn += n
        return rows

    def peek(self, n: int) -> list[Row]:
        """The next `n` samples, without advancing (for reading their teacher rows ahead)."""
        ahead = copy.copy(self)
        ahead.cursor, ahead.epoch, ahead.counts = self.cursor.copy(), self.epoch.copy(), self.counts.copy()
        return ahead.draw(n)

    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "seed": self.seed,
            "weights": self.weights.tolist(),
            "cursor": self.cursor.tolist(),
            "epoch": self.epoch.tolist(),
            "counts": self.counts.tolist(),
            "drawn": self.drawn,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["domains"] != self.domains:
            raise DataError(
                f"the checkpoint's mixture is over domains {state['domains']}, the data has {self.domains}"
            )
        if state["seed"] != self.seed:
            raise DataError(
                f"the checkpoint's mixture was seeded {state['seed']}, the config says {self.seed}"
            )
        self.weights = np.array(state["weights"], dtype=np.float64)
        self.cursor = np.array(state["cursor"], dtype=np.int64)
        self.epoch = np.array(state["epoch"], dtype=np.int64)
        self.counts = np.array(state["counts"], dtype=np.int64)
        self.drawn = int(state["drawn"])


def rank_slice(rows: list[Row], dp_rank: int, dp: int) -> list[Row]:
    """Data-parallel rank `dp_rank`'s contiguous share of a global batch."""
    per_rank = len(rows) // dp
    return rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def micro_batch_keys(
    rows: list[Row], dp_rank: int, dp: int, micro_batch: int
) -> list[list[tuple[str, str, int]]]:
    """The (domain, "train", index) keys of data-parallel rank `dp_rank`'s micro-batches of a global batch."""
    keys = [(domain, "train", index) for domain, index in rank_slice(rows, dp_rank, dp)]
    return [keys[i : i + micro_batch] for i in range(0, len(keys), micro_batch)]
