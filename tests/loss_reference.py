"""Dense single-process reference losses, written straight from docs/algorithms.md with full-vocabulary
tensors and autograd. The sharded, chunked, hand-differentiated losses are checked against these."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probabilities (0 log 0 = 0)."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    skew: float = 0.1,
    beta: float = 0.5,
    tau: float = 0.0,
) -> torch.Tensor:
    """Per-token divergence `[N]` between dense student/teacher logits `[N, V]` at temperature T."""
    lq = F.log_softmax(student_logits / temperature, -1)
    lp = F.log_softmax(teacher_logits / temperature, -1)
    q, p = lq.exp(), lp.exp()
    if name == "forward_kl":
        return _kl(lp, lq)
    if name == "reverse_kl":
        return _kl(lq, lp)
    if name == "skew_forward_kl":
        return _kl(lp, (skew * p + (1 - skew) * q).log())
    if name == "skew_reverse_kl":
        return _kl(lq, (skew * q + (1 - skew) * p).log())
    if name == "jsd":
        m = (beta * p + (1 - beta) * q).log()
        return beta * _kl(lp, m) + (1 - beta) * _kl(lq, m)
    if name == "taid":
        p_tau = F.softmax(
            (1 - tau) * (student_logits / temperature).detach() + tau * teacher_logits / temperature, -1
        )
        return -(p_tau * lq).sum(-1)
    raise ValueError(name)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits, labels, reduction="none")


def topk_tail_forward_kl(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """sum_k p_k (log p_k - log q_k) + r (log r - log(1 - sum_k q_k)), q over the full vocabulary."""
    q = F.softmax(student_logits / temperature, -1)
    q_kept = q.gather(-1, ids)
    p_kept = logprobs.exp()
    student_tail = 1 - q_kept.sum(-1)
    tail_term = torch.where(
        tail > 0, tail * (tail.clamp_min(1e-30).log() - student_tail.clamp_min(1e-30).log()), 0.0
    )
    return (p_kept * (logprobs - q_kept.log())).sum(-1) + tail_term


def sampled_cross_entropy(
    student_logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy against the count-normalised target built as a dense vector."""
    target = torch.zeros_like(student_logits)
    valid = ids >= 0
    target.scatter_add_(-1, ids.clamp_min(0), weights * valid)
    return -(target * F.log_softmax(student_logits, -1)).sum(-1)


def completed_teacher_logits(
    ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, vocab: int, teacher_vocab: int
) -> torch.Tensor:
    """The documented completion of a top-k teacher: kept values, tail spread uniformly over the unkept
    ids of the teacher's vocabulary, nothing beyond it."""
    k = ids.shape[-1]
    fill = (tail.clamp_min(1e-30) / max(teacher_vocab - k, 1)).log()
    full = fill.unsqueeze(-1).repeat(1, vocab)
    full[:, teacher_vocab:] = -1.0e4
    full.scatter_(-1, ids, logprobs)
    return full


def _sorted_l1(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_i |sort(q)_i - sort(p)_i| per row, the shorter vector zero-padded (ULD's closed-form W1)."""
    width = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1])).sort(-1, descending=True).values
    p = F.pad(p, (0, width - p.shape[-1])).sort(-1, descending=True).values
    return (q - p).abs().sum(-1)


def uld(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float,
    matched: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """ULD per student row `[N]`: the student's softmax at T against the teacher distribution
    `teacher_probs [N_t, V_t]` at row `index[i]` (-1: no teacher, 0). With `matched` = (student ids,
    teacher ids) of identical tokens: forward KL over those pairs plus sorted L1 over the other ids."""
    q = F.softmax(student_logits / temperature, -1)
    p = teacher_probs[index.clamp_min(0)]
    if matched is None:
        value = _sorted_l1(q, p)
    else:
        s_ids, t_ids = matched
        p_m, lq_m = p[:, t_ids], q[:, s_ids].log()
        kl = torch.where(p_m > 0, p_m * (p_m.clamp_min(1e-300).log() - lq_m), torch.zeros_like(p_m)).sum(-1)
        keep_s = torch.ones(q.shape[-1], dtype=torch.bool)
        keep_s[s_ids] = False
        keep_t = torch.ones(p.shape[-1], dtype=torch.bool)
        keep_t[t_ids] = False
        value = kl + _sorted_l1(q[:, keep_s], p[:, keep_t])
    return torch.where(index >= 0, value, torch.zeros_like(value))


def projected_kl(
    student_logits: torch.Tensor,
    kept_ids: torch.Tensor,
    kept_probs: torch.Tensor,
    tail: torch.Tensor,
    to_student: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float,
    teacher_next: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL per student row `[N]` against the teacher's kept ids `[N_t, k]` (-1: padding) mapped by
    `to_student [V_t]` (-1: none) onto the student's vocabulary, row by row with a dense vector: the
    probabilities of ids landing together summed, the tail plus the unmapped mass one bucket against
    the student's mass outside the projected ids; rows with `index` -1 give 0. With `teacher_next
    [N_t]` and `labels [N]`: the teacher's own next token at the row's position goes to the row's label."""
    log_q = F.log_softmax(student_logits / temperature, -1)
    values = []
    for row, at in enumerate(index.tolist()):
        if at < 0:
            values.append(log_q.new_zeros(()))
            continue
        projected = torch.zeros(log_q.shape[-1], dtype=torch.float64)
        present = torch.zeros(log_q.shape[-1], dtype=torch.bool)
        rest = float(tail[at])
        for t_id, p in zip(kept_ids[at].tolist(), kept_probs[at].double().tolist(), strict=True):
            if t_id < 0:
                continue
            s_id = int(to_student[t_id])
            if teacher_next is not None and labels is not None and t_id == int(teacher_next[at]):
                s_id = int(labels[row])
            if s_id < 0:
                rest += p
            else:
                projected[s_id] += p
                present[s_id] = True
        positive = present & (projected > 0)
        kl = (projected[positive] * (projected[positive].log() - log_q[row][positive])).sum()
        if rest > 0:
            kl = kl + rest * (math.log(rest) - log_q[row][~present].exp().sum().log())
        values.append(kl)
    return torch.stack(values)


def completed_teacher_probs(
    ids: torch.Tensor, kept: torch.Tensor, tail: torch.Tensor, vocab: int
) -> torch.Tensor:
    """A top-k cache row as the distribution ULD sees: kept probabilities, the tail spread evenly."""
    fill = tail / (vocab - ids.shape[-1])
    probs = fill.unsqueeze(-1).expand(ids.shape[0], vocab).clone()
    return probs.scatter(-1, ids, kept.exp())


def span_likelihood(
    student_logits: torch.Tensor, labels: torch.Tensor, spans: torch.Tensor, teacher_ll: torch.Tensor
) -> torch.Tensor:
    """Binarised KL of each span's likelihood `[G]`: P_t (L_t - L_s) + (1 - P_t) (log(1 - P_t) - log(1 - P_s)),
    L_s the sum of the student's label log-probs of the rows in the span (`spans [N]`, -1: none)."""
    label_lp = F.log_softmax(student_logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    inside = spans >= 0
    student_ll = torch.zeros(len(teacher_ll), dtype=torch.float64).index_add(
        0, spans[inside], label_lp[inside]
    )
    p_s, p_t = student_ll.exp(), teacher_ll.exp()
    return p_t * (teacher_ll - student_ll) + (1 - p_t) * (torch.log1p(-p_t) - torch.log1p(-p_s))
