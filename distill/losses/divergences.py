"""The divergences of docs/algorithms.md, per token, on vocabulary-sharded rows, with hand-written gradients.

Every function takes the student's log-probabilities `u = log q` on this rank's vocabulary slice
(`[c, V/tp]`, already normalised over the whole vocabulary) and the teacher's signal, and returns

- `value [c]`: the divergence per token (reduced over the tp group, equal on every tp rank), and
- `g_u [c, V/tp]`: its derivative with respect to `u`, treating each `u_j` as a free variable.

The caller turns `g_u` into the gradient with respect to the student's (scaled) logits through the
log-softmax Jacobian, `dL/ds = g_u - q * sum_v g_u` (one more all-reduce per token), which is linear,
so several weighted divergences share that step. The cached signals' `g_u` is non-zero only at the
kept ids: they return it as `Sparse` (global ids and values, the same on every rank), so a cached
KD step costs about what a CE step costs (no extra `[c, V/tp]` temporaries). Written this way, no loss needs autograd over a
`[tokens, V]` graph, and every formula holds unchanged when the vocabulary is split.

Dense teachers arrive as log-probabilities `lt [c, V/tp]`; the cached signals as ids and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from parallel.vocab import VocabShard, gather, log_softmax_, row_sum


@dataclass(frozen=True)
class Sparse:
    """A gradient that is non-zero only at `ids [c, k]` (global; -1 = padding with value 0)."""

    ids: torch.Tensor
    values: torch.Tensor  # [c, k], identical on every tp rank

    def scaled(self, factor: float) -> Sparse:
        return Sparse(self.ids, self.values * factor)


DENSE_DIVERGENCES = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd")


def _xlogy_diff(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """`p * (lp - lq)` with 0 where p == 0 (so an impossible teacher id never makes nan)."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))


def forward_kl(u: torch.Tensor, lt: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || q) = sum p (log p - log q)."""
    p = lt.exp()
    return row_sum(_xlogy_diff(p, lt, u), shard), -p


def reverse_kl(u: torch.Tensor, lt: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q || p) = sum q (log q - log p)."""
    q = u.exp()
    diff = u - lt
    return row_sum(q * diff, shard), q * (diff + 1)


def _log_mix(weight_a: float, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """log(a * exp(la) + (1 - a) * exp(lb)), stable for tiny probabilities."""
    return torch.logaddexp(la + math.log(weight_a), lb + math.log1p(-weight_a))


def skew_forward_kl(
    u: torch.Tensor, lt: torch.Tensor, shard: VocabShard, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || a p + (1 - a) q) (DistiLLM's skew KL)."""
    p, q = lt.exp(), u.exp()
    log_m = _log_mix(alpha, lt, u)
    return row_sum(_xlogy_diff(p, lt, log_m), shard), -(1 - alpha) * p * q / log_m.exp()


def skew_reverse_kl(
    u: torch.Tensor, lt: torch.Tensor, shard: VocabShard, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q || a q + (1 - a) p) (DistiLLM's skew reverse KL)."""
    q = u.exp()
    log_m = _log_mix(alpha, u, lt)
    diff = u - log_m
    return row_sum(q * diff, shard), q * (diff + 1 - alpha * q / log_m.exp())


def jsd(
    u: torch.Tensor, lt: torch.Tensor, shard: VocabShard, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized JSD (GKD): b KL(p || m) + (1 - b) KL(q || m), m = b p + (1 - b) q.

    The derivative simplifies: d/du_j = (1 - b) q_j (log q_j - log m_j)."""
    p, q = lt.exp(), u.exp()
    log_m = _log_mix(beta, lt, u)
    value = beta * row_sum(_xlogy_diff(p, lt, log_m), shard) + (1 - beta) * row_sum(q * (u - log_m), shard)
    return value, (1 - beta) * q * (u - log_m)


def dense(
    name: str, u: torch.Tensor, lt: torch.Tensor, shard: VocabShard, *, skew: float, jsd_beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence `name` (one of DENSE_DIVERGENCES) against a dense teacher."""
    if name == "forward_kl":
        return forward_kl(u, lt, shard)
    if name == "reverse_kl":
        return reverse_kl(u, lt, shard)
    if name == "skew_forward_kl":
        return skew_forward_kl(u, lt, shard, skew)
    if name == "skew_reverse_kl":
        return skew_reverse_kl(u, lt, shard, skew)
    if name == "jsd":
        return jsd(u, lt, shard, jsd_beta)
    raise ValueError(f"unknown divergence {name!r}")


def topk_tail_forward_kl(
    u: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, shard: VocabShard
) -> tuple[torch.Tensor, tuple[torch.Tensor, Sparse]]:
    """Forward KL over the k kept ids plus one tail bucket (docs/algorithms.md, "Top-k forward KL").

    ids, logprobs `[c, k]` (teacher log-probs over the full vocabulary), tail `[c]` = 1 - sum of kept p.
    The student's tail is the mass it puts on the unkept ids, `t = sum_{j not kept} q_j`, summed
    directly (not `1 - sum kept q`, which cancels catastrophically when the kept mass is near 1).
    The student is normalised over the whole vocabulary, never over the kept ids. With k = V the
    tail is empty and this is the dense forward KL exactly. d/du: `-p` at kept ids (sparse), and
    `-r q_j / t` at unkept ids (dense).
    """
    p_kept = logprobs.exp()  # [c, k]
    u_kept = gather(u, ids, shard)  # [c, k]
    unkept_q = u.exp()  # becomes q with this rank's kept ids zeroed  [c, V/tp]
    local, mine = shard.local(ids)
    # multiply by 0 at kept ids, by 1 at the clamped indices of ids held elsewhere (duplicates are safe)
    unkept_q.scatter_reduce_(-1, local, (~mine).to(unkept_q.dtype), reduce="prod")
    student_tail = row_sum(unkept_q, shard).clamp_min(1e-30)  # [c]
    has_tail = tail > 0
    tail_term = torch.where(has_tail, tail * (tail.clamp_min(1e-30).log() - student_tail.log()), 0.0)
    value = _xlogy_diff(p_kept, logprobs, u_kept).sum(-1) + tail_term
    ratio = torch.where(has_tail, tail / student_tail, 0.0)  # [c]
    return value, (unkept_q.mul_(-ratio.unsqueeze(-1)), Sparse(ids, -p_kept))


def sampled_cross_entropy(
    u: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shard: VocabShard
) -> tuple[torch.Tensor, Sparse]:
    """RS-KD: -sum_i p_hat(i) log q(i) with p_hat = count / N (ids `[c, n]`, padding id -1 weight 0).

    The cross-entropy form: it equals KL(p_hat || q) plus the entropy of p_hat, which does not depend on
    the student, so the gradient is the KL's."""
    value = -(weights * gather(u, ids, shard)).sum(-1)
    return value, Sparse(ids, -weights)


def taid_cross_entropy(
    u: torch.Tensor, teacher_logits: torch.Tensor, tau: float, shard: VocabShard
) -> tuple[torch.Tensor, torch.Tensor]:
    """TAID: -sum p_tau log q with p_tau = softmax((1 - tau) sg(s) + tau z_t) (logit-space interpolation).

    The student's log-probs `u` stand in for its scaled logits `s` and the teacher's log-probs for its
    logits: they differ by a per-token shift, which the softmax ignores. The student side is detached,
    as in the reference."""
    l_tau = log_softmax_((1 - tau) * u.detach() + tau * teacher_logits, shard)
    p_tau = l_tau.exp_()
    return -row_sum(p_tau * u, shard), p_tau.neg_()
