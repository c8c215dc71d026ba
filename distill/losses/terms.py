"""The registry of loss terms: one entry per term, what teacher signals it reads and its math per signal.

The fused loss (`fused.py`) computes the chunk's student log-probs `u` `[c, V/tp]` at the temperature and
asks each configured term, through `TERMS[name]`, for its value per token `[c]` and its gradient with
respect to `u` (dense `[c, V/tp]`, `divergences.Sparse` at given ids, or a tuple of both). A term lists
one function per teacher signal kind it accepts (`signal.py`: `live` and `topk` give the teacher's
distribution, `sampled` only draws, `aligned` a teacher with another tokenizer); for any other kind the
run stops with `refusal(name, kind)`. The span term (`span.py`) is not per chunk: it weights the label
gradient after a pre-pass over the whole micro-batch, so its entry only declares the kind it reads.

Adding a term: its math (`divergences.py`, or a module of its own), one entry here, and its weight in
the config (`LossWeightsConfig`; the config layer imports nothing of `distill`, so it keeps its own lists:
`CROSS_TOKENIZER_TERMS` for the terms that read an aligned teacher, and the sampled-cache rule of
`CampaignConfig`; `tests/unit/test_losses.py` holds those lists to this registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.losses import divergences, projection, uld
from distill.losses.signal import TeacherSignal
from parallel.vocab import VocabShard


@dataclass
class ChunkInputs:
    """What a term sees for one chunk of tokens."""

    u: torch.Tensor  # student log-probs at the temperature  [c, V/tp]
    rows: slice  # the chunk's rows in the micro-batch
    labels: torch.Tensor  # the student's next tokens at those rows  [c]
    teacher: TeacherSignal
    shard: VocabShard
    temperature: float
    tau: float  # TAID's interpolation weight at this step
    skew_alpha: float
    jsd_beta: float
    uld_top_m: int
    sums: dict[str, torch.Tensor]  # unweighted per-term sums of the call (a term may add its extras)
    _teacher_logprobs: torch.Tensor | None = None
    _teacher_top: uld.TeacherTop | None = None

    def teacher_logprobs(self) -> torch.Tensor:
        """The teacher's log-probs on this rank's shard `[c, V/tp]`, computed once per chunk."""
        if self._teacher_logprobs is None:
            self._teacher_logprobs = self.teacher.logprobs(self.rows, self.temperature, self.shard)
        return self._teacher_logprobs

    def teacher_top(self) -> uld.TeacherTop:
        """An aligned teacher's top ids at the chunk's rows, computed once per chunk (ULD and the
        projection share it: for a live teacher it is an output-layer matmul and a top-m merge)."""
        if self._teacher_top is None:
            self._teacher_top = self.teacher.top(self.rows, self.temperature, self.uld_top_m)
        return self._teacher_top


ValueAndGrad = Callable[[ChunkInputs], tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class Term:
    by_kind: dict[str, ValueAndGrad] = field(default_factory=dict)  # teacher signal kind -> math
    kinds: frozenset[str] = frozenset()  # the kinds it reads (by_kind's keys, or a pre-pass term's)
    extras: tuple[str, ...] = ()  # further sums reported beside the term (summed by the term)
    per_chunk: bool = True  # False: computed outside the chunk loop (span)

    def accepts(self, kind: str) -> bool:
        return kind in (self.kinds or frozenset(self.by_kind))


def _dense(name: str) -> ValueAndGrad:
    """A divergence between the full distributions (`divergences.dense`)."""

    def value_and_grad(x: ChunkInputs) -> tuple[torch.Tensor, Any]:
        return divergences.dense(
            name, x.u, x.teacher_logprobs(), x.shard, skew=x.skew_alpha, jsd_beta=x.jsd_beta
        )

    return value_and_grad


def _topk_forward_kl(x: ChunkInputs) -> tuple[torch.Tensor, Any]:
    t = x.teacher
    return divergences.topk_tail_forward_kl(
        x.u, t.ids[x.rows], t.logprobs_kept[x.rows], t.tail[x.rows], x.shard
    )


def _sampled_forward_kl(x: ChunkInputs) -> tuple[torch.Tensor, Any]:
    return divergences.sampled_cross_entropy(x.u, x.teacher.ids[x.rows], x.teacher.weights[x.rows], x.shard)


def _taid(x: ChunkInputs) -> tuple[torch.Tensor, Any]:
    return divergences.taid_cross_entropy(x.u, x.teacher_logprobs(), x.tau, x.shard)


def _uld(x: ChunkInputs) -> tuple[torch.Tensor, Any]:
    top = x.teacher_top()
    result = uld.uld(x.u, top, x.shard, x.uld_top_m, x.teacher.match)
    x.sums["uld_bound"] += result.bound.sum()
    x.sums["uld_pairs"] += top.mask.sum()
    return result.value, result.grads


def _projected_kl(x: ChunkInputs) -> tuple[torch.Tensor, Any]:
    if x.teacher.projection is None:
        raise ValueError(
            "loss term projected_kl needs the vocabulary projection (built by the aligned source)"
        )
    top = x.teacher_top()
    value, grads, unmapped = projection.projected_kl(x.u, top, x.teacher.projection, x.shard, x.labels)
    x.sums["projected_unmapped"] += unmapped.sum()
    return value, grads


_DISTRIBUTION = ("live", "topk")  # the signals that give the teacher's whole distribution

TERMS: dict[str, Term] = {
    "forward_kl": Term(
        {"topk": _topk_forward_kl, "sampled": _sampled_forward_kl, "live": _dense("forward_kl")}
    ),
    **{
        name: Term(dict.fromkeys(_DISTRIBUTION, _dense(name)))
        for name in ("reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd")
    },
    "taid": Term(dict.fromkeys(_DISTRIBUTION, _taid)),
    "uld": Term({"aligned": _uld}, extras=("uld_bound", "uld_pairs")),
    "projected_kl": Term({"aligned": _projected_kl}, extras=("projected_unmapped",)),
    "span": Term(kinds=frozenset({"aligned"}), per_chunk=False),
}


def refusal(name: str, kind: str | None) -> str:
    """Why term `name` cannot read a teacher signal of `kind` (or is not a term at all)."""
    if name not in TERMS:
        return f"unknown loss term {name!r}"
    if kind == "aligned":
        return (
            f"loss term {name} needs a teacher with the student's tokenizer (ULD compares across tokenizers)"
        )
    if TERMS[name].accepts("aligned"):
        return f"loss term {name} needs a teacher aligned across tokenizers (a paired prepare)"
    if kind == "sampled":
        return f"loss term {name} needs the teacher's distribution; a sampled cache holds draws only (forward_kl)"
    return f"loss term {name} does not read a {kind} teacher signal"


def value_and_grad(name: str, inputs: ChunkInputs) -> tuple[torch.Tensor, Any]:
    """Term `name`'s value `[c]` and d/du for the chunk, by the teacher signal's kind."""
    term = TERMS.get(name)
    kind = inputs.teacher.kind
    if term is None or kind not in term.by_kind:
        raise ValueError(refusal(name, kind))
    return term.by_kind[kind](inputs)


def extras_of(names: list[str]) -> list[str]:
    """The extra sums the terms `names` report beside their own (in registry order)."""
    return [extra for name in names if name in TERMS for extra in TERMS[name].extras]
