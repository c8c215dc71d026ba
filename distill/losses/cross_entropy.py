"""Cross-entropy on vocabulary-sharded logits, with the tensor-parallel group passed explicitly.

The megatron-core pattern: per token, the global max (all-reduce MAX), the global sum of exponentials
and the target's logit (all-reduce SUM of a masked local gather) cross the tp group; the full
vocabulary is never gathered. The backward pass is local: `softmax_local - onehot_local`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group: Any
    ) -> torch.Tensor:
        # logits [N, V/tp] (fp32), target [N] global ids -> loss [N]
        local_max = logits.max(dim=-1).values
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local_target = target - vocab_start
        in_shard = (local_target >= 0) & (local_target < logits.shape[-1])
        safe = local_target.clamp(0, logits.shape[-1] - 1)
        target_logit = shifted.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * in_shard
        dist.all_reduce(target_logit, group=group)
        exp.div_(sum_exp.unsqueeze(-1))  # becomes the local softmax, kept for backward
        ctx.save_for_backward(exp, safe, in_shard)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        softmax, safe, in_shard = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, safe] -= in_shard.to(grad.dtype)
        return grad * grad_loss.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int, group: Any
) -> torch.Tensor:
    """Per-token CE `[...]` of logits `[..., V/tp]` against global target ids `[...]`."""
    shape = target.shape
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return _VocabParallelCrossEntropy.apply(flat, target.reshape(-1), vocab_start, group).reshape(shape)


class CrossEntropyLoss:
    """The pluggable loss of a training step: `(loss_sum, num_tokens, report)` for one micro-batch."""

    name = "ce"

    def __init__(self, *, vocab_start: int, tp_group: Any) -> None:
        self.vocab_start = vocab_start
        self.tp_group = tp_group

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        # logits [b, s, V/tp], labels [b, s]
        per_token = vocab_parallel_cross_entropy(
            logits, labels, vocab_start=self.vocab_start, group=self.tp_group
        )
        loss_sum = per_token.sum()
        tokens = torch.tensor(labels.numel(), dtype=torch.int)
        return loss_sum, tokens, {"ce_sum": loss_sum.detach(), "tokens": tokens.clone()}
