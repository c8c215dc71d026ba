"""Reductions over a vocabulary split across the tensor-parallel group (the megatron-core pattern).

Each tp rank holds a contiguous slice `[start, start + size)` of the vocabulary, so a logit row is
`[tokens, V/tp]` there. Everything a loss needs per token is a handful of scalars: the global max
(all-reduce MAX), the global sum of exponentials (all-reduce SUM), and the values at given global ids
(masked local gather, all-reduce SUM). No function here ever gathers the vocabulary. The group is
always passed in; nothing reads a global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary and the group that holds the other slices."""

    start: int
    size: int
    group: Any  # the tensor-parallel process group (None: one process holds everything)

    @classmethod
    def of(cls, vocab_size: int, tp_rank: int, tp: int, group: Any) -> VocabShard:
        size = vocab_size // tp
        return cls(start=tp_rank * size, size=size, group=group)

    def sibling(self, vocab_size: int) -> VocabShard:
        """This rank's slice of another vocabulary split over the same group (a teacher with its own
        tokenizer, sharded like the student)."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return VocabShard(0, vocab_size, self.group)
        return VocabShard.of(
            vocab_size, dist.get_rank(self.group), dist.get_world_size(self.group), self.group
        )

    def local(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ids `[...]` -> (local index clamped into range, mask of ids this rank holds)."""
        local = ids - self.start
        mine = (local >= 0) & (local < self.size)
        return local.clamp(0, self.size - 1), mine

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def concat(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x [c, m]` side by side, `[c, tp * m]` in rank order (for merging per-shard
        top-m lists: a few columns per token, never the vocabulary)."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return x
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        out = torch.zeros(x.shape[0], world, x.shape[1], dtype=x.dtype, device=x.device)
        out[:, rank] = x
        dist.all_reduce(out, group=self.group)
        return out.reshape(x.shape[0], world * x.shape[1])

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x


def log_softmax(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Log-probabilities over the whole vocabulary of sharded `logits [c, V/tp]`, returned sharded."""
    row_max = shard.all_max(logits.max(dim=-1).values)  # [c]
    shifted = logits - row_max.unsqueeze(-1)
    sum_exp = shard.all_sum(shifted.exp().sum(dim=-1))  # [c]
    return shifted - sum_exp.log().unsqueeze(-1)


def log_softmax_(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """`log_softmax`, computed in place in `logits` (the fused losses' chunk buffer): saves a
    `[c, V/tp]` tensor per chunk."""
    row_max = shard.all_max(logits.max(dim=-1).values)  # [c]
    logits.sub_(row_max.unsqueeze(-1))
    sum_exp = shard.all_sum(logits.exp().sum(dim=-1))  # [c] (the exp is a transient)
    return logits.sub_(sum_exp.log().unsqueeze(-1))


def top_m(values: torch.Tensor, m: int, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """The `m` largest of sharded `values [c, V/tp]` over the whole vocabulary, descending, with their
    global ids: `([c, m], [c, m])` on every rank. Each rank's top m, exchanged and merged (the global
    top m is within the union of the shards' top m)."""
    local = min(m, values.shape[-1])
    vals, idx = values.topk(local, dim=-1)  # [c, m'] sorted descending
    vals, ids = shard.concat(vals), shard.concat(idx + shard.start)  # [c, tp * m']
    keep = min(m, vals.shape[-1])
    vals, order = vals.topk(keep, dim=-1)
    return vals, ids.gather(-1, order)


def row_sum(values: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Sum over the whole vocabulary of sharded `values [c, V/tp]` -> `[c]`."""
    return shard.all_sum(values.sum(dim=-1))


def gather(values: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """`values [c, V/tp]` at global `ids [c, k]` (negative ids: padding, give 0) -> `[c, k]` on every rank."""
    local, mine = shard.local(ids)
    picked = values.gather(-1, local) * mine
    return shard.all_sum(picked)


def scatter(values: torch.Tensor, ids: torch.Tensor, shard: VocabShard, out: torch.Tensor) -> torch.Tensor:
    """Add `values [c, k]` at global `ids [c, k]` into this rank's `out [c, V/tp]` (ids held elsewhere
    and negative padding ids are skipped). Ids of one row must be distinct."""
    local, mine = shard.local(ids)
    return out.scatter_add_(-1, local, values * mine)
