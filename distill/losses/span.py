"""Span-likelihood matching across tokenizers (approximate likelihood matching, Minixhofer et al. 2025).

Two tokenizations of one text share byte boundaries now and then (`distill/data/pairing/alignment.py:
span_groups`). Between two consecutive shared boundaries lies a span that both sides spell out fully:
its likelihood under the teacher, `L_t = sum log p_t(teacher tokens of the span)`, and under the
student, `L_s = sum log p_s(student tokens of the span)`, are likelihoods of the same bytes. The term
compares them as two Bernoulli probabilities (a binarised KL, so a span the student finds likelier than
the teacher is pulled down as well as up):

    span(g) = P_t (L_t - L_s) + (1 - P_t) (log(1 - P_t) - log(1 - P_s)),   P = exp(L)

Unlike ULD's sorted probabilities, it rewards only the text's own tokens, never a student piece that
its tokenizer would not choose there. Its gradient reaches the student through the log-probabilities
of its label tokens: `d span / d L_s = (P_s - P_t) / (1 - P_s)`, the same for every token of a span,
so the fused loss applies it as a per-token weight on the cross-entropy gradient (computed after a
forward-only pre-pass that gives `L_s`).
"""

from __future__ import annotations

import torch

# log(1 - P) is unbounded as P -> 1: spans are compared with L clamped below 0 by this much
MAX_LOG_LIKELIHOOD = -1e-4


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def span_loss(
    student_span: torch.Tensor, label_logprobs: torch.Tensor, teacher_span_ll: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`student_span [N]` (span of each student row, -1: none), `label_logprobs [N]` (log p_s of each
    row's label), `teacher_span_ll [G]` -> (value of each span `[G]`, d value / d log p_s per row `[N]`)."""
    if teacher_span_ll.numel() == 0:  # a micro-batch without a closed span (very short teacher sides)
        return teacher_span_ll.clone(), torch.zeros_like(label_logprobs)
    rows = student_span >= 0
    spans = student_span.clamp_min(0)
    student_ll = torch.zeros_like(teacher_span_ll).index_add_(
        0, spans[rows], label_logprobs[rows].to(teacher_span_ll.dtype)
    )  # [G]
    l_s = student_ll.clamp_max(MAX_LOG_LIKELIHOOD)
    l_t = teacher_span_ll.clamp_max(MAX_LOG_LIKELIHOOD)
    p_s, p_t = l_s.exp(), l_t.exp()
    value = p_t * (l_t - l_s) + (1 - p_t) * (_log1mexp(l_t) - _log1mexp(l_s))
    coef = (p_s - p_t) / -torch.expm1(l_s)  # d value / d L_s  [G]
    coef = torch.where(student_ll > MAX_LOG_LIKELIHOOD, torch.zeros_like(coef), coef)  # clamped: flat
    per_row = torch.where(rows, coef[spans], torch.zeros_like(coef[spans]))  # [N]
    return value, per_row
