"""The output layer fused with every loss term, chunked over tokens, on a vocabulary-sharded layer.

The student's last stage hands over its final hidden states `[N, h]` instead of logits. For each chunk
of tokens this computes the chunk's logits `[c, V/tp]` in fp32, every configured term's value per token
and its gradient with respect to the logits (hand-written, see `divergences.py`), then immediately the
gradients with respect to the hidden states `[c, h]` and the output weight `[V/tp, h]`, and drops the
chunk. So no `[N, V]` tensor exists, neither logits nor log-softmax nor their gradients, under any tp
(the Liger-Kernel recipe, here with the vocabulary split over ranks). Backward only scales the stored
gradients. The hidden-state gradient is summed over the tp group once at the end, because each rank
only saw its slice of the vocabulary (the all-reduce megatron's ColumnParallelLinear would do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from distill.losses import divergences
from distill.losses.teacher import Teacher
from parallel.vocab import VocabShard, gather, log_softmax, row_sum, scatter

AUTO_CHUNK_BYTES = 16 << 20  # fp32 logits per chunk and rank when `chunk_tokens` is auto


@dataclass(frozen=True)
class Terms:
    """What to compute: term weights (`ce` and the KD terms), temperature and term parameters."""

    weights: dict[str, float]
    temperature: float = 1.0
    skew_alpha: float = 0.1
    jsd_beta: float = 0.5
    chunk_tokens: int | None = None  # None: AUTO_CHUNK_BYTES of fp32 logits

    def chunk(self, vocab_local: int) -> int:
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        return max(16, AUTO_CHUNK_BYTES // (4 * vocab_local))


@dataclass
class ChunkedResult:
    loss_sum: torch.Tensor  # [] weighted total over the tokens
    term_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, per term
    grad_hidden: torch.Tensor | None = None  # [N, h] fp32, summed over the tp group
    grad_weight: torch.Tensor | None = None  # [V/tp, h] fp32


def _kd_value_and_grad(
    name: str,
    u: torch.Tensor,
    s: torch.Tensor,
    rows: slice,
    teacher: Teacher,
    terms: Terms,
    shard: VocabShard,
    tau: float,
    dense_lt: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One KD term on one chunk: value `[c]` and d/du `[c, V/tp]`."""

    def teacher_logprobs() -> torch.Tensor:  # computed once per chunk, shared by the dense terms
        if "lt" not in dense_lt:
            dense_lt["lt"] = teacher.logprobs(rows, terms.temperature, shard)
        return dense_lt["lt"]

    if name == "forward_kl" and teacher.kind == "topk":
        return divergences.topk_tail_forward_kl(
            u, teacher.ids[rows], teacher.logprobs_kept[rows], teacher.tail[rows], shard
        )
    if name == "forward_kl" and teacher.kind == "sampled":
        return divergences.sampled_cross_entropy(u, teacher.ids[rows], teacher.weights[rows], shard)
    if teacher.kind == "sampled":
        raise ValueError(
            f"loss term {name} needs the teacher's distribution; a sampled cache holds draws only (forward_kl)"
        )
    if name == "taid":
        return divergences.taid_cross_entropy(u, s, teacher_logprobs(), tau, shard)
    return divergences.dense(
        name, u, teacher_logprobs(), shard, skew=terms.skew_alpha, jsd_beta=terms.jsd_beta
    )


def _through_log_softmax(
    u: torch.Tensor,
    dense: torch.Tensor | None,
    sparse: list[divergences.Sparse],
    shard: VocabShard,
    temperature: float,
    grad_z: torch.Tensor | None,
) -> torch.Tensor:
    """dL/dz from dL/du (dense part and sparse parts): `(g_u - q * sum_v g_u) / T`, added to `grad_z`."""
    total = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)  # sum_v g_u  [c]
    if dense is not None:
        total += row_sum(dense, shard)
    for part in sparse:  # the values are the same on every rank: their sum is already global
        total += part.values.sum(-1)
    grad_s = u.exp().mul_(-total.unsqueeze(-1))  # [c, V/tp]
    if dense is not None:
        grad_s += dense
    for part in sparse:
        scatter(part.values, part.ids, shard, grad_s)
    if temperature != 1.0:
        grad_s /= temperature
    if grad_z is None:
        return grad_s
    return grad_z.add_(grad_s)


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    terms: Terms,
    shard: VocabShard,
    teacher: Teacher | None = None,
    tau: float = 0.0,
    need_grad: bool = True,
) -> ChunkedResult:
    """All terms over `hidden [N, h]` x `weight [V/tp, h]` against `labels [N]` (global ids) and the teacher."""
    n_tokens, _ = hidden.shape
    w32 = weight.float()  # [V/tp, h]
    temperature = terms.temperature
    kd = {name: w for name, w in terms.weights.items() if name != "ce" and w > 0}
    ce_weight = terms.weights.get("ce", 0.0)
    if kd and teacher is None:
        raise ValueError(f"loss terms {', '.join(kd)} need a teacher signal")
    result = ChunkedResult(loss_sum=torch.zeros((), dtype=torch.float64))
    sums = {name: torch.zeros((), dtype=torch.float64) for name in ([*(["ce"] if ce_weight else []), *kd])}
    if need_grad:
        result.grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        result.grad_weight = torch.zeros_like(w32)
    step = terms.chunk(shard.size)
    for start in range(0, n_tokens, step):
        rows = slice(start, min(start + step, n_tokens))
        h = hidden[rows].float()  # [c, h]
        z = h @ w32.t()  # [c, V/tp]
        total = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)  # [c]
        grad_z: torch.Tensor | None = None
        u_t1 = None
        if ce_weight:
            u_t1 = log_softmax(z, shard)
            target = labels[rows].unsqueeze(-1)  # [c, 1]
            ce = -gather(u_t1, target, shard).squeeze(-1)  # [c]
            total += ce_weight * ce
            sums["ce"] += ce.sum()
            if need_grad:  # softmax - onehot
                grad_z = u_t1.exp().mul_(ce_weight)
                scatter(torch.full_like(target, -ce_weight, dtype=z.dtype), target, shard, grad_z)
        if kd:
            s = z / temperature if temperature != 1.0 else z
            u = u_t1 if (u_t1 is not None and temperature == 1.0) else log_softmax(s, shard)
            dense_g: torch.Tensor | None = None  # d/du of the weighted KD terms: dense part [c, V/tp]
            sparse_g: list[divergences.Sparse] = []  # ... and parts at given ids
            dense_lt: dict[str, torch.Tensor] = {}
            scale = temperature * temperature
            for name, w in kd.items():
                value, grad_u = _kd_value_and_grad(name, u, s, rows, teacher, terms, shard, tau, dense_lt)
                total += (w * scale) * value
                sums[name] += value.sum()
                if not need_grad:
                    continue
                for part in grad_u if isinstance(grad_u, tuple) else (grad_u,):
                    if isinstance(part, divergences.Sparse):
                        sparse_g.append(part.scaled(w * scale))
                    elif dense_g is None:
                        dense_g = part * (w * scale)
                    else:
                        dense_g.add_(part, alpha=w * scale)
            if need_grad:
                grad_z = _through_log_softmax(u, dense_g, sparse_g, shard, temperature, grad_z)
        result.loss_sum += total.sum()
        if grad_z is not None:
            result.grad_hidden[rows] = grad_z @ w32  # [c, h]
            result.grad_weight.addmm_(grad_z.t(), h)  # [V/tp, h]
    if result.grad_hidden is not None:
        shard.all_sum(result.grad_hidden)  # each rank contributed its vocabulary slice
    result.term_sums = sums
    return result


class _FusedOutputLoss(torch.autograd.Function):
    """loss_sum = chunked_loss(hidden, weight, ...); the gradients were computed in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, compute: Any) -> torch.Tensor:
        result: ChunkedResult = compute(hidden.detach(), weight.detach())
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.save_for_backward(result.grad_hidden, result.grad_weight)
        return result.loss_sum.to(torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            (grad_hidden * grad_loss).to(ctx.hidden_dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
        )


def fused_output_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    terms: Terms,
    shard: VocabShard,
    teacher: Teacher | None = None,
    tau: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Differentiable total loss (sum over tokens) of `hidden [N, h]` through the sharded output layer
    `weight [V/tp, h]`, and the unweighted per-term sums (detached) for metrics."""
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out: dict[str, ChunkedResult] = {}

    def compute(h: torch.Tensor, w: torch.Tensor) -> ChunkedResult:
        out["r"] = chunked_loss(
            h, w, labels, terms=terms, shard=shard, teacher=teacher, tau=tau, need_grad=need_grad
        )
        return out["r"]

    if need_grad:
        loss = _FusedOutputLoss.apply(hidden, weight, compute)
    else:
        loss = compute(hidden, weight).loss_sum.to(torch.float32)
    return loss, out["r"].term_sums
