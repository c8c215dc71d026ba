"""`TeacherSignal`: the teacher's signal for one micro-batch, in the form the losses read it chunk by chunk.

Where it comes from is a `TeacherSource` (`distill/teacher/`: the cache, or a live teacher); what it
is, is one of three kinds:

- `LiveSignal`: the online teacher's final hidden states `[N, h_t]` and its output-layer slice
  `[V/tp, h_t]`; each chunk's logits are computed on demand, so the teacher never holds a
  `[tokens, V]` tensor either.
- `TopKSignal`: the cached k largest log-probs per token with their ids and the tail mass.
- `SampledSignal`: the cached RS-KD draws, ids with weights count / N.

Every kind gives `logprobs(rows, temperature, shard)`, the teacher's log-probabilities on this rank's
vocabulary slice, where it is defined: exact for the live teacher; for top-k + tail the *completed*
distribution, which keeps the k stored values and spreads the tail mass uniformly over the unkept ids
of the teacher's vocabulary (ids beyond the teacher's vocabulary get probability 0). With k = V the
tail is empty and the completion is the teacher's exact distribution. RS-KD draws define no
distribution beyond the estimate itself, so the sampled kind has none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from distill.losses.projection import VocabProjection
from distill.losses.uld import TeacherTop, VocabMatch
from parallel.vocab import VocabShard, log_softmax, scatter, top_m

IMPOSSIBLE = -1.0e4  # log-probability of ids outside the teacher's vocabulary (exp underflows to 0)


@dataclass
class LiveSignal:
    hidden: torch.Tensor  # [N, h_t]
    weight: torch.Tensor  # [V/tp, h_t]

    kind = "live"

    def __post_init__(self) -> None:
        self._w32 = self.weight.float()  # cast once per micro-batch, not per chunk

    def logits(self, rows: slice) -> torch.Tensor:
        return self.hidden[rows].float() @ self._w32.t()  # [c, V/tp]

    def logprobs(self, rows: slice, temperature: float, shard: VocabShard) -> torch.Tensor:
        return log_softmax(self.logits(rows) / temperature, shard)


@dataclass
class TopKSignal:
    ids: torch.Tensor  # [N, k] global ids
    logprobs_kept: torch.Tensor  # [N, k]
    tail: torch.Tensor  # [N]
    vocab_size: int  # the teacher's vocabulary: where the tail mass is spread

    kind = "topk"

    def logprobs(self, rows: slice, temperature: float, shard: VocabShard) -> torch.Tensor:
        del temperature  # the cache's values are already at the cache's temperature (checked in the config)
        ids, kept_lp, tail = self.ids[rows], self.logprobs_kept[rows], self.tail[rows]
        unkept = max(self.vocab_size - ids.shape[-1], 1)
        fill = (tail.clamp_min(1e-30) / unkept).log()  # [c]
        outside = torch.arange(shard.start, shard.start + shard.size, device=ids.device) >= self.vocab_size
        base = fill.unsqueeze(-1).expand(ids.shape[0], shard.size).masked_fill(outside, IMPOSSIBLE)
        kept = scatter(torch.ones_like(kept_lp), ids, shard, torch.zeros_like(base))
        values = scatter(kept_lp, ids, shard, torch.zeros_like(base))
        completed = torch.where(kept > 0, values, base)
        return log_softmax(completed, shard)  # renormalised: quantized values need not sum to exactly 1


@dataclass
class SampledSignal:
    ids: torch.Tensor  # [N, n] global ids, -1 = padding
    weights: torch.Tensor  # [N, n] count / N, 0 for padding

    kind = "sampled"

    def logprobs(self, rows: slice, temperature: float, shard: VocabShard) -> torch.Tensor:
        raise ValueError("a sampled cache defines no teacher distribution beyond its draws")


@dataclass
class CachedTop:
    """The cache's top-k over the teacher's positions: ids and kept log-probs `[N_t, k]`, tail mass `[N_t]`
    (at the cache's temperature, which the config checks is the loss's)."""

    ids: torch.Tensor
    kept_logprobs: torch.Tensor
    tail: torch.Tensor

    def top(self, at: torch.Tensor, mask: torch.Tensor, temperature: float, m: int, vocab: int) -> TeacherTop:
        return TeacherTop(self.ids[at], self.kept_logprobs[at].exp(), self.tail[at], vocab, mask)


@dataclass
class LiveTop:
    """The live teacher's final hidden states `[N_t, h_t]` and output-layer slice `[V_t/tp, h_t]`, its own
    vocabulary split over the student's tp group (`shard`); the top m is taken per chunk."""

    hidden: torch.Tensor
    weight: torch.Tensor
    shard: VocabShard

    def top(self, at: torch.Tensor, mask: torch.Tensor, temperature: float, m: int, vocab: int) -> TeacherTop:
        logits = self.hidden[at].float() @ self.weight.float().t() / temperature  # [c, V_t/tp]
        probs, ids = top_m(log_softmax(logits, self.shard).exp_(), m, self.shard)
        return TeacherTop(ids, probs, (1 - probs.sum(-1)).clamp_min(0), vocab, mask)


@dataclass
class SpanTargets:
    """Byte-aligned spans (`span.py`): each student row's span `[N]` (-1: none), and the teacher's
    log-likelihood of each span `[G]`."""

    student: torch.Tensor
    teacher: torch.Tensor


@dataclass
class AlignedSignal:
    """A teacher with another tokenizer (ULD), at the student's rows: `index [N]` is the teacher position
    paired with each student row (-1: none; `distill/data/pairing/alignment.py`); `teacher` is where its top m
    comes from (the cache's top-k, or the live teacher); `top` gives it as `TeacherTop` per chunk."""

    index: torch.Tensor  # [N] int64
    vocab_size: int  # the teacher's
    teacher: CachedTop | LiveTop
    match: VocabMatch | None = None  # hybrid ULD
    spans: SpanTargets | None = None  # the span term
    projection: VocabProjection | None = None  # the projected_kl term
    teacher_next: torch.Tensor | None = None  # [N_t] the teacher's own next token at each of its positions

    kind = "aligned"

    def top(self, rows: slice, temperature: float, m: int) -> TeacherTop:
        index = self.index[rows]
        mask, at = index >= 0, index.clamp_min(0)
        top = self.teacher.top(at, mask, temperature, m, self.vocab_size)
        if self.teacher_next is None:
            return top
        return dataclasses.replace(top, next_ids=torch.where(mask, self.teacher_next[at], -1))


TeacherSignal = LiveSignal | TopKSignal | SampledSignal | AlignedSignal


def signal_from_cache_rows(
    rows: dict[str, torch.Tensor], teacher_vocab: int, device: torch.device
) -> TeacherSignal:
    """A micro-batch of `CacheReader.batch` output (`[b, s, ...]`, host memory) as a flat-token teacher
    on the student's device."""
    flat = {k: v.reshape(-1, *v.shape[2:]).to(device, non_blocking=True) for k, v in rows.items()}
    if "tail" in flat:
        return TopKSignal(flat["ids"].long(), flat["logprobs"], flat["tail"], teacher_vocab)
    return SampledSignal(flat["ids"].long(), flat["weights"])
