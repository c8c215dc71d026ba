"""Vocabulary projection: the teacher's distribution mapped onto the student's vocabulary, then forward KL.

A teacher with another tokenizer predicts teacher tokens; at a byte-aligned position (both sides'
next tokens start at the same byte, `loss.uld.alignment: byte_offset`) its distribution over what
comes next can be read as one over the student's tokens by mapping every teacher id to one student
id and summing the probabilities that land on the same one (docs/algorithms.md, "Vocabulary
projection"; MinED in tokenkit is the same idea with another mapping). The mapping
(`distill/teacher/aligned.py`, `vocab_projection`): the student token with the identical bytes, else
the longest student token that is a prefix of the teacher token's bytes (what a student would emit
first for that text), else none (mass that cannot be placed). One teacher id is mapped in context
instead: the teacher's own next token goes to the student's own next token (the label), because the
text after it is known (`project`). On the demo pair this lifts the share of aligned rows where the
student's label gets any projected mass from ~77% to ~86% (the rest: the teacher's own token outside its
kept top k), and the fixed map alone can never give a student token longer than the teacher's (10-16%
of aligned rows there).

**The loss per aligned row.** The teacher's kept ids (a cache's top k, or the live teacher's top m)
project to student ids `j` with summed probabilities `P_j`; the rest of its mass (its tail, plus kept
ids with no student twin) is one bucket `R`, compared with the student's mass `Q_rest` on every
student id outside the projected set:

    L = sum_j P_j (log P_j - log q_j) + R (log R - log Q_rest)

which is the top-k + tail-bucket forward KL (`divergences.topk_tail_forward_kl`) over the student's
vocabulary: the same vocabulary-parallel arithmetic (gathers at ids and row sums, never the whole
vocabulary), the same sparse gradient at the projected ids plus a dense part through `Q_rest`. With a
one-to-one mapping and no tail it is the exact forward KL; many teacher ids on one student id are a
coarser but still proper distribution. Rows without an aligned teacher position give 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.losses.divergences import Sparse, topk_tail_forward_kl
from distill.losses.uld import TeacherTop
from parallel.vocab import VocabShard


@dataclass(frozen=True)
class VocabProjection:
    """Each teacher id's student id (`[V_t]`, -1: none) and how the mapping was made."""

    teacher_to_student: torch.Tensor  # [V_t] int64
    exact: int  # teacher ids whose bytes are a student token's
    prefix: int  # teacher ids mapped to the longest student token that is a prefix of their bytes
    unmapped: int


@dataclass
class ProjectedTeacher:
    """The teacher's kept ids projected and merged: one entry per distinct student id (-1: padding)."""

    ids: torch.Tensor  # [c, k] student ids, each at most once per row
    probs: torch.Tensor  # [c, k] summed teacher probabilities (0 at padding)
    rest: torch.Tensor  # [c] teacher mass with no projected id: its tail and its unmapped kept ids


def project(top: TeacherTop, projection: VocabProjection, labels: torch.Tensor) -> ProjectedTeacher:
    """Map `top`'s kept ids to student ids and sum the probabilities of ids that land together.

    In context: where the row knows the teacher's own next token (`top.next_ids`) and the student's
    (`labels [c]`), that teacher id goes to the student's label, whatever the fixed map says: the text
    after it is the text the student reads, so the student's first token of it is known, and it can be
    longer than the teacher's token (which no fixed map of one teacher token can give).

    Per row: sort the mapped ids, start a group at every change; group g's id and summed probability
    go to slot g (groups packed to the left). The sums are differences of one running sum, so no
    atomic adds decide their rounding (deterministic on a GPU), and nothing waits for the host.
    Unmapped and padding ids sort first as -1: their group is padding, the unmapped mass goes to `rest`."""
    kept = top.ids >= 0
    student = torch.where(kept, projection.teacher_to_student[top.ids.clamp_min(0)], -1)  # [c, k]
    if top.next_ids is not None:
        own = kept & (top.ids == top.next_ids.unsqueeze(-1))  # [c, k]: the teacher's own next token
        student = torch.where(own, labels.unsqueeze(-1), student)
    probs = torch.where(kept, top.probs, torch.zeros_like(top.probs))
    rest = top.tail + torch.where(student >= 0, torch.zeros_like(probs), probs).sum(-1)  # [c]
    ordered, order = student.sort(-1)  # [c, k]
    ordered_p = torch.where(ordered >= 0, probs.gather(-1, order), torch.zeros_like(probs))
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    group = starts.long().cumsum(-1) - 1  # [c, k]
    running = ordered_p.cumsum(-1)
    # the running sum before each group's first entry, carried along the group (it never decreases)
    before = torch.where(starts, running - ordered_p, torch.zeros_like(running)).cummax(-1).values
    totals = torch.where(ends, running - before, torch.zeros_like(running))  # one entry per group
    summed = torch.zeros_like(ordered_p).scatter_add_(-1, group, totals)  # adds zeros to one value: exact
    ids = torch.full_like(ordered, -1).scatter_(-1, group, ordered)  # a group's entries share its id
    return ProjectedTeacher(ids, torch.where(ids >= 0, summed, torch.zeros_like(summed)), rest)


def projected_kl(
    u: torch.Tensor,
    top: TeacherTop,
    projection: VocabProjection,
    shard: VocabShard,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, Sparse], torch.Tensor]:
    """Forward KL of the projected teacher against student log-probs `u [c, V/tp]`: value `[c]`, d/du
    (dense `[c, V/tp]` and sparse at the projected ids), and the kept mass with no student id `[c]`
    (0 at rows without a teacher; logged as `loss/projected_unmapped`, per student token). `labels [c]`:
    the student's next tokens, for the in-context mapping of the teacher's own next token (`project`)."""
    projected = project(top, projection, labels)
    logprobs = torch.where(
        projected.probs > 0,
        projected.probs.clamp_min(1e-30).log(),
        torch.full_like(projected.probs, -torch.inf),
    )
    value, (dense, sparse) = topk_tail_forward_kl(u, projected.ids, logprobs, projected.rest, shard)
    mask = top.mask.to(u.dtype)  # [c]
    unmapped = (projected.rest - top.tail).clamp_min(0) * mask
    weights = mask.unsqueeze(-1)
    return value * mask, (dense.mul_(weights), Sparse(sparse.ids, sparse.values * weights)), unmapped
