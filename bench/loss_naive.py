"""The naive baseline of bench/loss.py: output layer and top-k distillation loss through full logits.

tp1: `logits = hidden @ W.T` (`[N, V]`), `log_softmax`, gather the k ids, forward KL over the kept ids
plus the tail bucket, autograd. tp > 1: each rank's `[N, V/tp]` logits through a plain vocab-parallel
log-softmax built from all-reduces (`_AllSum`), autograd through it.
"""

from __future__ import annotations

import torch


class _AllSum(torch.autograd.Function):
    """Optionally all-reduce SUM forward and/or backward (megatron's copy-to / reduce-from region). A sum
    whose result is used by every rank alike needs no backward sum; a replicated input used by rank-local
    math (the hidden states, the softmax denominator) gets partial gradients that are summed."""

    @staticmethod
    def forward(ctx, x, forward_sum: bool, backward_sum: bool):
        import torch.distributed as dist

        ctx.backward_sum = backward_sum
        if not forward_sum:
            return x.view_as(x)
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        if ctx.backward_sum:
            grad = grad.clone()
            dist.all_reduce(grad)
        return grad, None, None


def naive_loss(hidden, weight, ids, logprobs, tail, tp: int, start: int):
    """Mean forward KL (kept ids + tail bucket) of the full-vocabulary (tp1) or V/tp-wide (tp>1) logits."""
    if tp > 1:
        hidden = _AllSum.apply(hidden, False, True)  # each rank's logits give part of d/d hidden
    logits = hidden @ weight.t()  # [N, V/tp] fp32
    if tp == 1:
        u = torch.log_softmax(logits, -1)
        u_kept = u.gather(-1, ids)  # [N, k]
    else:
        import torch.distributed as dist

        row_max = logits.detach().max(-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)  # a constant shift: no gradient needed
        shifted = logits - row_max.unsqueeze(-1)
        sum_exp = _AllSum.apply(shifted.exp().sum(-1), True, True)
        u = shifted - sum_exp.log().unsqueeze(-1)
        local = ids - start
        mine = (local >= 0) & (local < weight.shape[0])
        picked = u.gather(-1, local.clamp(0, weight.shape[0] - 1)) * mine
        u_kept = _AllSum.apply(picked, True, False)  # [N, k], used alike on every rank
    p_kept = logprobs.exp()
    student_tail = (1 - u_kept.exp().sum(-1)).clamp_min(1e-30)
    tail_term = torch.where(tail > 0, tail * (tail.clamp_min(1e-30).log() - student_tail.log()), 0.0)
    return ((p_kept * (logprobs - u_kept)).sum(-1) + tail_term).mean()
