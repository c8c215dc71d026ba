"""The output layer fused with every loss term, chunked over tokens, on a vocabulary-sharded layer.

The student's last stage hands over its final hidden states `[N, h]` instead of logits. For each chunk
of tokens this computes the chunk's logits `[c, V/tp]` in fp32, every configured term's value per token
and its gradient with respect to the logits (each term's math from the registry, `terms.py`; hand-written
gradients, `divergences.py`), then immediately the gradients with respect to the hidden states `[c, h]`
and the output weight `[V/tp, h]`, and drops the chunk. So no `[N, V]` tensor exists, neither logits nor log-softmax nor their gradients, under any tp
(the Liger-Kernel recipe, here with the vocabulary split over ranks). Backward only scales the stored
gradients. The hidden-state gradient is summed over the tp group once at the end, because each rank
only saw its slice of the vocabulary (the all-reduce megatron's ColumnParallelLinear would do).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.losses import divergences, span
from distill.losses.signal import TeacherSignal
from distill.losses.terms import TERMS, ChunkInputs, extras_of, refusal, value_and_grad
from parallel.vocab import VocabShard, gather, log_softmax, log_softmax_, row_sum, scatter

# fp32 logits per chunk and rank when `chunk_tokens` is auto: on a CPU a chunk that stays near the caches;
# on a GPU one large enough that each chunk's matmuls fill the device (bench/loss_memory.py measures both)
AUTO_CHUNK_BYTES = 16 << 20
AUTO_CHUNK_BYTES_CUDA = 256 << 20


@dataclass(frozen=True)
class Terms:
    """What to compute: term weights (`ce` and the KD terms), temperature and term parameters."""

    weights: dict[str, float]
    temperature: float = 1.0
    skew_alpha: float = 0.1
    jsd_beta: float = 0.5
    chunk_tokens: int | None = None  # None: AUTO_CHUNK_BYTES (_CUDA) of fp32 logits
    tf32: bool = False  # CUDA: the fp32 matmuls on TF32 tensor cores (`loss.tf32`)
    uld_top_m: int = 128  # sorted probabilities compared per position by ULD (see `uld.py`)

    def chunk(self, vocab_local: int, device: torch.device | None = None) -> int:
        """Tokens per chunk for a `[chunk, vocab_local]` slice of logits on `device` (CPU if None)."""
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        budget = AUTO_CHUNK_BYTES_CUDA if device is not None and device.type == "cuda" else AUTO_CHUNK_BYTES
        return max(16, budget // (4 * vocab_local))


@dataclass
class ChunkedResult:
    loss_sum: torch.Tensor  # [] weighted total over the tokens
    term_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, per term
    grad_hidden: torch.Tensor | None = None  # [N, h] fp32, summed over the tp group
    grad_weight: torch.Tensor | None = None  # [V/tp, h] fp32


class _ChunkBuffers:
    """Two `[chunk, V/tp]` fp32 buffers reused by every chunk of a call: the logits (then, in place, the
    log-probs) and the logit gradient. Reusing them keeps the allocator from piling up freed chunks."""

    def __init__(self, rows: int, vocab_local: int, device: torch.device) -> None:
        self.logits = torch.empty(rows, vocab_local, dtype=torch.float32, device=device)
        self.grad = torch.empty(rows, vocab_local, dtype=torch.float32, device=device)


def _kd_grad(
    u: torch.Tensor,
    dense: torch.Tensor | None,
    sparse: list[divergences.Sparse],
    shard: VocabShard,
    temperature: float,
    grad_z: torch.Tensor | None,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """dL/dz of the KD terms from their dL/du (dense and sparse parts), `(g_u - q sum_v g_u) / T`,
    added to `grad_z` (the CE part) or written into `buffer`."""
    total = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)  # sum_v g_u  [c]
    if dense is not None:
        total += row_sum(dense, shard)
    for part in sparse:  # the values are the same on every rank: their sum is already global
        total += part.values.sum(-1)
    scale = -total.unsqueeze(-1) / temperature
    grad_s = u.exp() if grad_z is not None else torch.exp(u, out=buffer)
    grad_s.mul_(scale)
    if dense is not None:
        grad_s.add_(dense, alpha=1 / temperature)
    for part in sparse:
        scatter(part.values / temperature, part.ids, shard, grad_s)
    return grad_s if grad_z is None else grad_z.add_(grad_s)


def _chunk(
    h: torch.Tensor,
    w32: torch.Tensor,
    labels: torch.Tensor,
    rows: slice,
    *,
    terms: Terms,
    shard: VocabShard,
    teacher: TeacherSignal | None,
    tau: float,
    sums: dict[str, torch.Tensor],
    buffers: _ChunkBuffers,
    need_grad: bool,
    label_grad_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted per-token loss `[c]` of one chunk and its gradient with respect to the logits.
    `label_grad_weight [c]`: per-token weight of the cross-entropy gradient when it is not `ce`'s
    (the span term adds its own there)."""
    c, temperature = h.shape[0], terms.temperature
    kd = {name: w for name, w in terms.weights.items() if name != "ce" and w > 0 and TERMS[name].per_chunk}
    ce_weight = terms.weights.get("ce", 0.0)
    z = torch.matmul(h, w32.t(), out=buffers.logits[:c])  # [c, V/tp]
    total = torch.zeros(c, dtype=torch.float32, device=h.device)  # [c]
    grad_z: torch.Tensor | None = None
    u = None  # student log-probs at the temperature  [c, V/tp]
    if ce_weight or label_grad_weight is not None:
        u_t1 = log_softmax(z, shard) if (kd and temperature != 1.0) else log_softmax_(z, shard)
        target = labels.unsqueeze(-1)  # [c, 1]
        ce = -gather(u_t1, target, shard).squeeze(-1)  # [c]
        if ce_weight:
            total += ce_weight * ce
            sums["ce"] += ce.sum()
        if need_grad:  # softmax - onehot, per token
            grad_weight = (
                label_grad_weight.unsqueeze(-1)
                if label_grad_weight is not None
                else torch.full_like(target, ce_weight, dtype=z.dtype)
            )  # [c, 1]
            grad_z = torch.exp(u_t1, out=buffers.grad[:c]).mul_(grad_weight)
            scatter(-grad_weight, target, shard, grad_z)
        if temperature == 1.0:
            u = u_t1
    if not kd:
        return total, grad_z
    if u is None:
        u = log_softmax_(z.div_(temperature) if temperature != 1.0 else z, shard)
    dense_g: torch.Tensor | None = None  # d/du of the weighted KD terms: dense part [c, V/tp]
    sparse_g: list[divergences.Sparse] = []  # ... and parts at given ids
    assert teacher is not None
    inputs = ChunkInputs(
        u=u,
        rows=rows,
        labels=labels,
        teacher=teacher,
        shard=shard,
        temperature=temperature,
        tau=tau,
        skew_alpha=terms.skew_alpha,
        jsd_beta=terms.jsd_beta,
        uld_top_m=terms.uld_top_m,
        sums=sums,
    )
    scale = temperature * temperature
    for name, w in kd.items():
        value, grad_u = value_and_grad(name, inputs)  # the term's math for this kind of teacher (terms.py)
        total += (w * scale) * value
        sums[name] += value.sum()
        if not need_grad:
            continue
        for part in grad_u if isinstance(grad_u, tuple) else (grad_u,):
            if isinstance(part, divergences.Sparse):
                sparse_g.append(part.scaled(w * scale))
            elif dense_g is None:
                dense_g = part.mul_(w * scale)  # the divergence's own fresh tensor
            else:
                dense_g.add_(part, alpha=w * scale)
        del grad_u
    del inputs  # the teacher's log-probs of the chunk, before the gradient needs the memory
    if need_grad:
        grad_z = _kd_grad(u, dense_g, sparse_g, shard, temperature, grad_z, buffers.grad[:c])
    return total, grad_z


def label_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    shard: VocabShard,
    step: int,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(label) `[N]` of `hidden [N, h]` through the sharded output layer `weight [V/tp, h]`, chunk by
    chunk (`step` tokens; `buffer`: a `[step, V/tp]` fp32 scratch), without gradients."""
    w32 = weight.float()
    buffer = (
        buffer
        if buffer is not None
        else torch.empty(step, shard.size, dtype=torch.float32, device=hidden.device)
    )
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, min(start + step, hidden.shape[0]))
            z = torch.matmul(hidden[rows].float(), w32.t(), out=buffer[: rows.stop - rows.start])  # [c, V/tp]
            out[rows] = gather(log_softmax_(z, shard), labels[rows].unsqueeze(-1), shard).squeeze(-1)
    return out


def _span_term(
    hidden: torch.Tensor,
    w32: torch.Tensor,
    labels: torch.Tensor,
    terms: Terms,
    shard: VocabShard,
    teacher: TeacherSignal | None,
    step: int,
    buffers: _ChunkBuffers,
    sums: dict[str, torch.Tensor],
    result: ChunkedResult,
) -> torch.Tensor:
    """The span term (`span.py`): a forward-only pre-pass for the student's label log-probs `[N]`, the
    spans' values into the loss, and the per-token weight of the label gradient `[N]` (`ce`'s plus the
    span term's) for the main pass."""
    if teacher is None or teacher.kind != "aligned" or teacher.spans is None:
        raise ValueError(
            "loss term span needs a teacher aligned across tokenizers with its spans (a paired prepare)"
        )
    logprobs = label_logprobs(hidden, w32, labels, shard, step, buffers.logits)  # [N]
    value, per_row = span.span_loss(teacher.spans.student, logprobs, teacher.spans.teacher)
    weight = terms.weights["span"]
    sums["span"] += value.sum()
    result.loss_sum += weight * value.sum()
    return (terms.weights.get("ce", 0.0) - weight * per_row).float()  # [N]


@contextmanager
def _matmul_tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA fp32 matmuls inside the block (torch's switch is global: restored after)."""
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    terms: Terms,
    shard: VocabShard,
    teacher: TeacherSignal | None = None,
    tau: float = 0.0,
    need_grad: bool = True,
) -> ChunkedResult:
    """All terms over `hidden [N, h]` x `weight [V/tp, h]` against `labels [N]` (global ids) and the teacher."""
    with _matmul_tf32(terms.tf32 and hidden.is_cuda):
        return _chunked_loss(
            hidden, weight, labels, terms=terms, shard=shard, teacher=teacher, tau=tau, need_grad=need_grad
        )


def _chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    terms: Terms,
    shard: VocabShard,
    teacher: TeacherSignal | None,
    tau: float,
    need_grad: bool,
) -> ChunkedResult:
    n_tokens, _ = hidden.shape
    w32 = weight.float()  # [V/tp, h]
    kd = [name for name, w in terms.weights.items() if name != "ce" and w > 0]  # span included
    if kd and teacher is None:
        raise ValueError(f"loss terms {', '.join(kd)} need a teacher signal")
    unknown = [name for name in kd if name not in TERMS]
    kind = teacher.kind if teacher is not None else None
    refused = [refusal(name, kind) for name in unknown] + [
        refusal(name, kind)
        for name in kd
        if kind is not None and name in TERMS and not TERMS[name].accepts(kind)
    ]
    if refused:
        raise ValueError("; ".join(refused))
    result = ChunkedResult(loss_sum=torch.zeros((), dtype=torch.float64, device=hidden.device))
    names = [name for name, w in terms.weights.items() if w > 0]
    names += extras_of(names)
    sums = {name: torch.zeros((), dtype=torch.float64, device=hidden.device) for name in names}
    if need_grad:
        result.grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        result.grad_weight = torch.zeros_like(w32)
    step = min(terms.chunk(shard.size, hidden.device), n_tokens)
    buffers = _ChunkBuffers(step, shard.size, hidden.device)
    label_grad = None
    if terms.weights.get("span", 0.0) > 0:
        label_grad = _span_term(hidden, w32, labels, terms, shard, teacher, step, buffers, sums, result)
    for start in range(0, n_tokens, step):
        rows = slice(start, min(start + step, n_tokens))
        h = hidden[rows].float()  # [c, h]
        total, grad_z = _chunk(
            h,
            w32,
            labels[rows],
            rows,
            terms=terms,
            shard=shard,
            teacher=teacher,
            tau=tau,
            sums=sums,
            buffers=buffers,
            need_grad=need_grad,
            label_grad_weight=label_grad[rows] if label_grad is not None else None,
        )
        result.loss_sum += total.sum()
        if grad_z is not None:
            torch.matmul(grad_z, w32, out=result.grad_hidden[rows])  # [c, h]
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
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the fused loss's backward runs once (it scales its saved gradients in place)")
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.saved_tensors  # scaled in place: no second [V/tp, h] copy
        return (
            grad_hidden.mul_(grad_loss).to(ctx.hidden_dtype),
            grad_weight.mul_(grad_loss).to(ctx.weight_dtype),
            None,
        )


def fused_output_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    terms: Terms,
    shard: VocabShard,
    teacher: TeacherSignal | None = None,
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
