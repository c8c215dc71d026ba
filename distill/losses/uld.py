"""ULD: the sorted-probability L1 between a student and a teacher with different vocabularies.

Per aligned position (docs/algorithms.md, "ULD"): sort both probability vectors descending, zero-pad the
shorter vocabulary, `L = sum_i |q_(i) - p_(i)|`, the closed-form Wasserstein-1 distance between the
sorted distributions (Boizard et al. 2024).

**Under tensor parallelism without the vocabulary.** The student's probabilities are sharded
`[c, V/tp]`. Only the top of the sorted vector is built: each rank's top m, merged (`top_m`), gives
the exact global top m `q_(1..m)`; the teacher gives its own top m `p_(1..m)` (a cache: its k kept
values, then its tail spread evenly over its unkept ids). With the remaining masses
`R_q = 1 - sum q_(1..m)` and `R_p = (total teacher mass) - sum p_(1..m)`, the rest of the sum lies
between `|R_q - R_p|` (triangle inequality) and `R_q + R_p`. We compute

    L_m = sum_{i <= m} |q_(i) - p_(i)| + |R_q - R_p|,   0 <= L - L_m <= 2 min(R_q, R_p),

so the truncation error is at most `uld_bound = 2 min(R_q, R_p)` per position, reported as a metric;
it is 0 once either distribution has all its mass in its top m (e.g. m >= V).

**Gradient.** d/dq_j is `sign(q_(i) - p_(i))` at the student's top-m ids and `sigma = sign(R_q - R_p)`
at every other id. The softmax Jacobian ignores a constant added to all of d/dq, so subtracting
`sigma` leaves a gradient that is non-zero only at the top-m ids: sparse, like the cached KD terms.

**Hybrid** (GOLD): ids whose token bytes are identical in both vocabularies (`VocabMatch`) are compared
directly by forward KL, `sum_matched p log(p / q)`; the sorted L1 (with the same truncation) runs over
the unmatched ids of each side. The teacher's matched ids beyond its kept ones get its spread tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.losses.divergences import Sparse
from parallel.vocab import VocabShard, gather, row_sum, top_m


@dataclass(frozen=True)
class TeacherTop:
    """The teacher at each student row of a chunk: its kept ids and probabilities (descending),
    the mass outside them, its vocabulary size, and which rows have an aligned teacher position."""

    ids: torch.Tensor  # [c, k] teacher ids, -1 = padding (probability 0)
    probs: torch.Tensor  # [c, k]
    tail: torch.Tensor  # [c] mass on the teacher's unkept ids, spread evenly over them
    vocab: int
    mask: torch.Tensor  # [c] bool: the row has a teacher position
    next_ids: torch.Tensor | None = None  # [c] the teacher's own next token at each row (-1: none)


@dataclass(frozen=True)
class VocabMatch:
    """Ids with identical token bytes in both vocabularies (hybrid ULD), as the loss needs them."""

    student_mask: torch.Tensor  # [V/tp] bool: this rank's student ids that have a teacher twin
    teacher_to_student: torch.Tensor  # [V_t] global student id of each teacher id, -1 none
    count: int  # matched pairs in the whole vocabulary


@dataclass
class UldResult:
    value: torch.Tensor  # [c]
    bound: torch.Tensor  # [c] the most the exact loss exceeds `value`
    grads: tuple  # d value / du: Sparse parts and at most one dense [c, V/tp]


def _sorted_teacher(probs: torch.Tensor, fill: torch.Tensor, unkept: torch.Tensor, m: int) -> torch.Tensor:
    """The first m entries of the teacher's sorted vector: its kept values and `fill` for each of its
    `unkept` ids, sorted, then zeros (the padding of the smaller vocabulary). Kept slots that do not
    take part (padding, or matched ids in hybrid mode) hold 0."""
    c = probs.shape[0]
    slots = torch.arange(m, device=probs.device).expand(c, m)  # [c, m]
    spread = torch.where(
        slots < unkept.unsqueeze(-1), fill.unsqueeze(-1), torch.zeros_like(fill).unsqueeze(-1)
    )
    return torch.cat([probs, spread], dim=-1).topk(m, dim=-1).values  # [c, m]


def _sorted_l1(
    q_top: torch.Tensor, q_ids: torch.Tensor, q_rest: torch.Tensor, p_top: torch.Tensor, p_rest: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Sparse, torch.Tensor]:
    """Truncated sorted L1 from the two top-m vectors and the masses after them: value, bound, the
    sparse d/du at the student's top ids (sigma removed), and sigma `[c]`."""
    diff = q_top - p_top  # [c, m]
    value = diff.abs().sum(-1) + (q_rest - p_rest).abs()
    bound = 2 * torch.minimum(q_rest, p_rest).clamp_min(0)
    sigma = torch.sign(q_rest - p_rest)
    return value, bound, Sparse(q_ids, q_top * (torch.sign(diff) - sigma.unsqueeze(-1))), sigma


def uld(
    u: torch.Tensor, teacher: TeacherTop, shard: VocabShard, m: int, match: VocabMatch | None = None
) -> UldResult:
    """ULD per row of student log-probs `u [c, V/tp]` (rows without a teacher give 0)."""
    mask = teacher.mask.to(u.dtype)  # [c]
    kept = teacher.ids >= 0
    probs = torch.where(kept, teacher.probs, torch.zeros_like(teacher.probs))
    n_kept = kept.sum(-1)  # [c]
    fill = teacher.tail / (teacher.vocab - n_kept).clamp_min(1)  # [c] each unkept teacher id
    q = u.exp()  # [c, V/tp]
    if match is None:
        q_top, q_ids = top_m(q, m, shard)
        q_rest = (1 - q_top.sum(-1)).clamp_min(0)
        p_top = _sorted_teacher(probs, fill, teacher.vocab - n_kept, q_top.shape[-1])
        p_rest = (probs.sum(-1) + teacher.tail - p_top.sum(-1)).clamp_min(0)
        value, bound, sparse, _ = _sorted_l1(q_top, q_ids, q_rest, p_top, p_rest)
        return UldResult(value * mask, bound * mask, (Sparse(q_ids, sparse.values * mask.unsqueeze(-1)),))
    return _hybrid(u, q, teacher, probs, kept, fill, shard, m, match, mask)


def _hybrid(
    u: torch.Tensor,
    q: torch.Tensor,
    teacher: TeacherTop,
    probs: torch.Tensor,
    kept: torch.Tensor,
    fill: torch.Tensor,
    shard: VocabShard,
    m: int,
    match: VocabMatch,
    mask: torch.Tensor,
) -> UldResult:
    twin = torch.where(kept, match.teacher_to_student[teacher.ids.clamp_min(0)], -1)  # [c, k] student id
    matched = twin >= 0
    # forward KL over the matched ids: kept ones exactly, unkept ones at the teacher's fill value
    p_matched = torch.where(matched, probs, torch.zeros_like(probs))
    u_twin = gather(u, twin, shard)  # [c, k] (0 where no twin)
    log_p = p_matched.clamp_min(1e-30).log()
    kept_kl = torch.where(matched, p_matched * (log_p - u_twin), torch.zeros_like(probs)).sum(-1)
    unkept_matched = match.count - matched.sum(-1)  # [c]
    u_matched_sum = row_sum(u * match.student_mask, shard) - u_twin.sum(-1)  # over unkept matched ids
    log_fill = fill.clamp_min(1e-30).log()
    spread_kl = torch.where(
        fill > 0, fill * (unkept_matched * log_fill - u_matched_sum), torch.zeros_like(fill)
    )
    # sorted L1 over each side's unmatched ids
    q_unmatched = q.masked_fill(match.student_mask, 0.0)
    q_top, q_ids = top_m(q_unmatched, m, shard)
    q_rest = (row_sum(q_unmatched, shard) - q_top.sum(-1)).clamp_min(0)
    p_unmatched = torch.where(matched, torch.zeros_like(probs), probs)
    unkept_unmatched = (teacher.vocab - match.count) - (kept & ~matched).sum(-1)
    p_top = _sorted_teacher(p_unmatched, fill, unkept_unmatched, q_top.shape[-1])
    p_rest = (p_unmatched.sum(-1) + fill * unkept_unmatched - p_top.sum(-1)).clamp_min(0)
    l1, bound, sparse, sigma = _sorted_l1(q_top, q_ids, q_rest, p_top, p_rest)
    # d/du: -p at matched ids (fill at the unkept ones: dense; kept ones: sparse, correcting the fill);
    # sigma * q at unmatched ids outside the top m (dense), the top ids' part is in `sparse`
    weights = mask.unsqueeze(-1)
    dense = torch.where(match.student_mask, -fill.unsqueeze(-1), sigma.unsqueeze(-1) * q) * weights
    kept_part = Sparse(
        twin, torch.where(matched, fill.unsqueeze(-1) - p_matched, torch.zeros_like(probs)) * weights
    )
    value = (kept_kl + spread_kl + l1) * mask
    return UldResult(value, bound * mask, (dense, kept_part, Sparse(q_ids, sparse.values * weights)))
