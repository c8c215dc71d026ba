"""Which teacher position each student position is compared with, when the two tokenizers differ.

Inputs are a paired sequence's byte ends (`pairs.py`): `student_ends [S + 1]` and `teacher_ends [n]`
(the teacher's real tokens), non-decreasing offsets into the same text. Student position `i` predicts
student token `i + 1`; teacher position `j` predicts teacher token `j + 1`. The result is, for each
student position, the teacher position it is paired with, or -1.

- **byte_offset** (default). Walk both tokenizations; a group closes where both reach the same byte
  boundary `c`. After each such `c` the next group starts with the first token of each side that ends
  beyond `c` (student `k`, teacher `l`); position `k - 1` of the student and `l - 1` of the teacher both
  have read exactly the text up to `c` and predict the group's first token: they are paired. A group of
  several tokens on either side is compared at its first position only (TRL's GOLD rule), so multi-byte
  characters split differently, a leading space glued to the next word on one side only, and tokens of
  no bytes (BOS, a second byte-fallback piece) never misalign what follows: the next common boundary
  starts over. Each EOS is one virtual byte on both sides, so the EOS predictions pair up too.
- **positional** (the ULD paper, for reproduction): student position `i` with teacher position `i`,
  up to the shorter sequence. It drifts as soon as the tokenizations' lengths differ.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Alignment = Literal["byte_offset", "positional"]


def byte_offset_pairs(student_ends: np.ndarray, teacher_ends: np.ndarray) -> np.ndarray:
    """`[S]` teacher position paired with each student position (-1: none), by common byte boundaries."""
    s_ends = np.asarray(student_ends, dtype=np.int64)
    t_ends = np.asarray(teacher_ends, dtype=np.int64)
    paired = np.full(len(s_ends) - 1, -1, dtype=np.int64)
    if len(t_ends) < 2:
        return paired
    common = np.intersect1d(s_ends, t_ends)  # boundaries both tokenizations reach
    k = np.searchsorted(s_ends, common, side="right")  # first student token ending beyond c
    j = np.searchsorted(t_ends, common, side="right")
    ok = (k < len(s_ends)) & (j < len(t_ends))  # the group has a first token on both sides
    paired[k[ok] - 1] = j[ok] - 1
    return paired


def positional_pairs(student_positions: int, teacher_length: int) -> np.ndarray:
    """`[S]`: position i with teacher position i, for i below the shorter of the two."""
    paired = np.full(student_positions, -1, dtype=np.int64)
    n = max(0, min(student_positions, teacher_length - 1))
    paired[:n] = np.arange(n)
    return paired


def split_offset_row(row: np.ndarray, student_tokens: int) -> tuple[int, np.ndarray, np.ndarray]:
    """A stored offsets row -> (teacher length, student ends `[S + 1]`, teacher ends `[length]`)."""
    length = int(row[0])
    student = row[1 : 1 + student_tokens].astype(np.int64)
    teacher = row[1 + student_tokens : 1 + student_tokens + length].astype(np.int64)
    return length, student, teacher


def align_rows(
    offset_rows: np.ndarray, student_tokens: int, teacher_tokens: int, how: Alignment
) -> np.ndarray:
    """A micro-batch's offsets `[b, 1 + S + 1 + T + 1]` -> `[b * S]` index into the teacher's flat
    positions `[b * T]` (row r's position j is `r * T + j`), -1 where a student position has none."""
    b = offset_rows.shape[0]
    s, t = student_tokens - 1, teacher_tokens - 1
    out = np.full((b, s), -1, dtype=np.int64)
    for r in range(b):
        length, student, teacher = split_offset_row(offset_rows[r], student_tokens)
        paired = byte_offset_pairs(student, teacher) if how == "byte_offset" else positional_pairs(s, length)
        out[r] = np.where(paired >= 0, paired + r * t, -1)
    return out.reshape(-1)


def _groups_of(ends: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Group of each token: `g` when `common[g] < end <= common[g + 1]`, -1 outside every closed group."""
    g = np.searchsorted(common, ends, side="left") - 1
    return np.where((g >= 0) & (g + 1 < len(common)), g, -1)


def span_groups(
    offset_rows: np.ndarray, student_tokens: int, teacher_tokens: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Byte-aligned spans for span-likelihood matching: the text between two consecutive boundaries that
    both tokenizations reach, where every token on both sides is predicted (a span holding either
    side's first token, or running past the teacher's truncation, is dropped). Returns the span of each
    student position `[b * S]` and of each teacher position `[b * T]` (the span of the token it
    predicts; -1: none), numbered over the micro-batch, and the number of spans."""
    b = offset_rows.shape[0]
    s, t = student_tokens - 1, teacher_tokens - 1
    student_span = np.full((b, s), -1, dtype=np.int64)
    teacher_span = np.full((b, t), -1, dtype=np.int64)
    count = 0
    for r in range(b):
        length, s_ends, t_ends = split_offset_row(offset_rows[r], student_tokens)
        if length < 2:
            continue
        common = np.intersect1d(s_ends, t_ends)
        s_group, t_group = _groups_of(s_ends, common), _groups_of(t_ends, common)
        unpredicted = {int(s_group[0]), int(t_group[0])} - {-1}  # spans holding a side's first token
        for g in unpredicted:
            s_group[s_group == g], t_group[t_group == g] = -1, -1
        used = np.unique(np.concatenate([s_group[1:], t_group[1:]]))
        used = used[used >= 0]
        renumber = np.full(len(common), -1, dtype=np.int64)
        renumber[used] = np.arange(len(used)) + count
        student_span[r] = np.where(s_group[1:] >= 0, renumber[s_group[1:]], -1)
        teacher_span[r, : length - 1] = np.where(t_group[1:] >= 0, renumber[t_group[1:]], -1)
        count += len(used)
    return student_span.reshape(-1), teacher_span.reshape(-1), count
