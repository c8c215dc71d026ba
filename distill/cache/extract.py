"""Teacher signal extraction from vocabulary-sharded logits, without gathering the vocabulary.

The teacher's last pipeline stage holds logits `[N, V/tp]` per tensor-parallel rank. Per token only
a few numbers cross the tp group: the max and the sum of exponentials (log-normaliser), each rank's
local top-k candidates (k values and ids; the global top-k is among their union), each rank's share of
the probability mass (to route sampling draws), and the drawn ids. Tokens are processed in chunks so
no `[tokens, V/tp]` temporary grows with the batch. The same uniforms give the same draws at any tp:
rank r owns the draws that fall in its slice [sum of masses of ranks < r, + its mass) of the CDF.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

CHUNK_TOKENS = 1024


class ChunkedLogits:
    """Logits `[N, V/tp]` computed chunk by chunk from hidden states `[N, h]` and the output weight slice
    `[V/tp, h]` when the extraction asks for rows (`x[lo:hi]`): only `CHUNK_TOKENS` rows of logits exist
    at a time, whatever the vocabulary (262k for Gemma 3) and the micro-batch."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        self.hidden, self.weight = hidden, weight
        self.shape = (hidden.shape[0], weight.shape[0])
        self.device = hidden.device

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return torch.matmul(self.hidden[rows], self.weight.t())


def _all_reduce(x: torch.Tensor, group: Any, op: Any = dist.ReduceOp.SUM) -> None:
    """All-reduce over the tp `group`; None: one process holds the whole vocabulary, nothing to do."""
    if group is not None:
        dist.all_reduce(x, op=op, group=group)


def _all_gather(x: torch.Tensor, group: Any) -> list[torch.Tensor]:
    if group is None:
        return [x]
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return parts


def _normalize(z: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global softmax pieces over the sharded last dimension: `exp(z - max)` `[n, V/tp]`, the global
    max `[n]` and log-normaliser `[n]` (one exp per element; two all-reduces of a scalar per token)."""
    m = z.max(dim=-1).values
    _all_reduce(m, group, dist.ReduceOp.MAX)
    e = (z - m.unsqueeze(-1)).exp_()
    s = e.sum(dim=-1)
    _all_reduce(s, group)
    return e, m, m + s.log()


def _picked(z: torch.Tensor, target: torch.Tensor, vocab_start: int, group: Any) -> torch.Tensor:
    """z[target] for global ids `target` `[n]` whose column lives on one tp rank."""
    local = target - vocab_start
    mine = (local >= 0) & (local < z.shape[-1])
    picked = z.gather(-1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * mine
    _all_reduce(picked, group)
    return picked


def topk_with_tail(
    logits: torch.Tensor, k: int, *, temperature: float, target: torch.Tensor, vocab_start: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global top-k of softmax(logits / T): ids `[N, k]` (descending), log-probs `[N, k]`, tail mass `[N]`,
    and log p(target) at T = 1 `[N]`."""
    n = logits.shape[0]
    ids = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    target_lp = torch.empty(n, dtype=torch.float32, device=logits.device)
    for lo in range(0, n, CHUNK_TOKENS):
        raw = logits[lo : lo + CHUNK_TOKENS].float()
        z = raw / temperature if temperature != 1.0 else raw
        lse = _normalize(z, group)[2]
        lse_1 = lse if temperature == 1.0 else _normalize(raw, group)[2]
        target_lp[lo : lo + CHUNK_TOKENS] = (
            _picked(raw, target[lo : lo + CHUNK_TOKENS], vocab_start, group) - lse_1
        )
        values, index = z.topk(min(k, z.shape[-1]), dim=-1)  # this rank's candidates [c, k]
        candidates = _all_gather(values, group)
        candidate_ids = _all_gather(index + vocab_start, group)
        best, where = torch.cat(candidates, dim=-1).topk(k, dim=-1)
        ids[lo : lo + CHUNK_TOKENS] = torch.cat(candidate_ids, dim=-1).gather(-1, where)
        logprobs[lo : lo + CHUNK_TOKENS] = best - lse.unsqueeze(-1)
    tail = (1.0 - logprobs.double().exp().sum(dim=-1)).clamp(0.0, 1.0).float()
    return ids, logprobs, tail, target_lp


SAMPLE_BLOCK = 64  # vocabulary entries per block of the two-level inverse CDF


def sample_ids(
    logits: torch.Tensor, uniforms: torch.Tensor, *, target: torch.Tensor, vocab_start: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws from softmax(logits) (T = 1) by inverse CDF of the given uniforms `[N, n]` -> ids `[N, n]`,
    and log p(target) `[N]`.

    The CDF is over the unnormalised weights `exp(z - max)` (the global max is exact, so the weights are
    bitwise the same at any tp) and is two-level: a float64 cumulative sum over the sums of blocks of
    `SAMPLE_BLOCK` ids, then a float64 cumulative sum inside the one block a draw lands in (a draw past
    the inner total by float64 rounding takes the block's last id). Each draw is `u * total mass`; rank r
    owns the draws in its slice of the mass. Sums are float64, so tp layouts agree on every draw
    except with probability ~1e-16 per draw. The exponentials are float32 (a transient float64 copy is
    made only to sum the blocks) and the cumulative sum is over `[c, V/tp / 64]` block sums, not over
    the whole chunk: half the cost of the float64 CDF this replaced."""
    tp, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    out = torch.empty(uniforms.shape, dtype=torch.int64, device=logits.device)
    target_lp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    vocab_local = logits.shape[-1]
    block = SAMPLE_BLOCK if vocab_local % SAMPLE_BLOCK == 0 else vocab_local
    for lo in range(0, logits.shape[0], CHUNK_TOKENS):
        z = logits[lo : lo + CHUNK_TOKENS].float()  # [c, V/tp]
        c = z.shape[0]
        m = z.max(dim=-1).values
        _all_reduce(m, group, dist.ReduceOp.MAX)
        picked = _picked(z, target[lo : lo + CHUNK_TOKENS], vocab_start, group)
        e = (z - m.unsqueeze(-1)).exp_()  # unnormalised weights [c, V/tp]
        # float64 block sums: an ulp of difference in one small weight (teacher logits at another tp
        # may differ in the last bit) then moves the CDF by that weight's ulp, not by a float32 ulp
        # of the whole block. (Convert, then sum: `sum(dtype=float64)` is 30x slower on CPU.)
        blocks = e.double().view(c, -1, block).sum(dim=-1)  # [c, V/tp / block]
        block_cdf = torch.cumsum(blocks, dim=-1)
        mass = block_cdf[:, -1].contiguous()  # this rank's share [c]
        stacked = torch.stack(_all_gather(mass, group))  # [tp, c]
        total = stacked.sum(dim=0)
        target_lp[lo : lo + CHUNK_TOKENS] = (picked - m - total.log()).float()
        start = (torch.cumsum(stacked, dim=0) - stacked)[rank].unsqueeze(-1)  # [c, 1]
        t = uniforms[lo : lo + CHUNK_TOKENS].double() * total.unsqueeze(-1)  # [c, n] in mass units
        mine = t >= start
        if rank < tp - 1:
            mine &= t < start + mass.unsqueeze(-1)
        r = (t - start).clamp(min=0.0).contiguous()
        which = torch.searchsorted(block_cdf, r, right=True).clamp(max=block_cdf.shape[-1] - 1)  # [c, n]
        before = torch.where(which > 0, block_cdf.gather(-1, (which - 1).clamp(min=0)), 0.0)
        inside = e.view(c, -1, block).gather(1, which.unsqueeze(-1).expand(-1, -1, block))  # [c, n, block]
        within = torch.searchsorted(
            torch.cumsum(inside.double(), dim=-1), (r - before).unsqueeze(-1), right=True
        ).squeeze(-1)
        local = which * block + within.clamp(max=block - 1)
        drawn = torch.where(mine, local + vocab_start, torch.zeros_like(local))
        _all_reduce(drawn, group)
        out[lo : lo + CHUNK_TOKENS] = drawn
    return out, target_lp


def distinct_with_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws `[L, n]` -> distinct ids per position `[L]`, ids and counts `[sum]` (position by position, ascending)."""
    ordered = draws.sort(dim=-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    starts = first.reshape(-1).nonzero().squeeze(-1)
    counts = torch.diff(starts, append=torch.tensor([ordered.numel()], device=starts.device))
    return first.sum(dim=-1), ordered.reshape(-1)[starts], counts
