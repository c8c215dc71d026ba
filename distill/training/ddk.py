"""The domain mixture of a training run: fixed weights, or DDK's domain-discrepancy reweighting.

DDK (Liu et al. 2024; docs/algorithms.md#ddk): the teacher's per-domain held-out perplexity `l_T` is computed
once (from the cache's stored log-probs of the actual next tokens, or a pass of the online teacher) and
kept in the training state. Every `interval` steps the student's per-domain held-out perplexity `l_S`
is evaluated by the whole job and the weights move toward the domains where the student lags most
relative to the teacher:

    r_0     = alpha * softmax(l_S / l_T) + (1 - alpha) / N
    psi_i   = r_t[i] * exp(l_S[i] / l_T[i])
    r_{t+1} = alpha * psi / sum(psi) + (1 - alpha) / N          (factor-smooth update)

r_0 gets the same smoothing as every update (the paper's r_0 is the bare softmax): a student far from
the teacher, such as a random initialisation whose ratios are in the hundreds, would otherwise spend
its first interval on a single domain.

Guardrails (not in the paper): the update compounds (r_t carries every earlier exp(ratio)), so a domain
that lags for a few intervals takes the whole floor the `alpha` mixing leaves. Each new r is therefore
moved only part of the way from the old one (`smoothing` s: r = s * r_old + (1 - s) * r_new) and then
brought within each domain's [min_weight, max_weight] by `within_bounds`.

The next `interval` steps sample domains with `r`. Weights, teacher perplexities and the sampler state
are checkpointed, so a resumed run continues the same sequence of samples and weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from distill.config.data import MixtureConfig
from distill.data.mixture import MixtureSampler, Row


def ddk_initial(
    student_ppl: dict[str, float], teacher_ppl: dict[str, float], alpha: float = 1.0
) -> dict[str, float]:
    """r_0 = alpha * softmax(l_S / l_T) + (1 - alpha) / N (alpha = 1: the paper's r_0)."""
    domains = list(student_ppl)
    ratio = np.array([student_ppl[d] / teacher_ppl[d] for d in domains])
    e = np.exp(ratio - ratio.max())
    r0 = alpha * e / e.sum() + (1 - alpha) / len(domains)
    return {d: float(v) for d, v in zip(domains, r0, strict=True)}


def ddk_update(
    weights: dict[str, float], student_ppl: dict[str, float], teacher_ppl: dict[str, float], alpha: float
) -> dict[str, float]:
    """r_{t+1} = alpha * psi / sum(psi) + (1 - alpha) / N with psi = r_t * exp(l_S / l_T)."""
    domains = list(weights)
    ratio = np.array([student_ppl[d] / teacher_ppl[d] for d in domains])
    # psi / sum(psi) computed with the largest exponent factored out (ratios can be in the tens)
    log_psi = np.log(np.maximum([weights[d] for d in domains], 1e-300)) + ratio
    psi = np.exp(log_psi - log_psi.max())
    new = alpha * psi / psi.sum() + (1 - alpha) / len(domains)
    return {d: float(v) for d, v in zip(domains, new, strict=True)}


def within_bounds(weights: dict[str, float], bounds: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The weights scaled by one factor c and clipped to their bounds, clip(c * w, lo, hi), with c such
    that they sum to 1: domains inside their bounds keep their proportions to each other.

    The sum is non-decreasing in c, so c is found by bisection on log c. The weights are divided by
    the largest and raised to at least 1e-300: a weight of exactly 0 (the softmax of ratios thousands
    apart underflows) could never leave its lower bound, and with c <= 1e300 every domain can reach
    its upper one, so a solution exists whenever sum(lo) <= 1 <= sum(hi), which the config's
    validation guarantees.
    """
    domains = list(weights)
    w = np.array([max(weights[d], 0.0) for d in domains])
    w = np.maximum(w / w.max(), 1e-300) if w.max() > 0 else np.ones_like(w)
    lo = np.array([bounds[d][0] for d in domains])
    hi = np.array([bounds[d][1] for d in domains])

    def total(c: float) -> float:
        return float(np.clip(c * w, lo, hi).sum())

    small, large = 1e-300, 1.0
    while total(large) < 1.0 and large < 1e300:
        large = min(large * 2.0**64, 1e300)
    for _ in range(200):  # 200 halvings of the log interval: far below float resolution
        middle = math.sqrt(small) * math.sqrt(large)
        small, large = (middle, large) if total(middle) < 1.0 else (small, middle)
    clipped = np.clip(large * w, lo, hi)
    # the remaining error (<< 1e-12) goes to the domains strictly inside their bounds, if any
    inside = (clipped > lo) & (clipped < hi)
    if inside.any():
        clipped[inside] += (1.0 - clipped.sum()) * clipped[inside] / clipped[inside].sum()
    return {d: float(v) for d, v in zip(domains, clipped, strict=True)}


def fixed_weights(config: MixtureConfig, sizes: dict[str, int]) -> dict[str, float]:
    """The starting weights: natural (by size), uniform, static (as given); ddk starts uniform until r_0."""
    if config.type == "natural":
        return {d: float(n) for d, n in sizes.items()}
    if config.type == "static":
        assert config.weights is not None
        return dict(config.weights)
    return {d: 1.0 for d in sizes}


class DomainMixture:
    """The sampler plus the DDK schedule; `evaluate_student` / `evaluate_teacher` give held-out
    perplexity per domain (collective calls: every rank runs them together)."""

    def __init__(self, config: MixtureConfig, sizes: dict[str, int], seed: int) -> None:
        self.config = config
        self.sampler = MixtureSampler(sizes, fixed_weights(config, sizes), seed)
        self.bounds = config.weight_bounds(list(sizes)) if self.is_ddk else {}
        self.teacher_ppl: dict[str, float] | None = None
        self.updates = 0

    @property
    def is_ddk(self) -> bool:
        return self.config.type == "ddk"

    def next_batch(self, global_batch: int) -> list[Row]:
        return self.sampler.draw(global_batch)

    def peek_batch(self, global_batch: int) -> list[Row]:
        return self.sampler.peek(global_batch)

    def start(
        self,
        evaluate_student: Callable[[], dict[str, float]],
        evaluate_teacher: Callable[[], dict[str, float]],
    ) -> dict[str, Any] | None:
        """Before the first step of a fresh run: DDK's teacher perplexities and r_0. Returns what to log."""
        if not self.is_ddk:
            return None
        self.teacher_ppl = evaluate_teacher()
        student = evaluate_student()
        self.sampler.set_weights(
            within_bounds(ddk_initial(student, self.teacher_ppl, self.config.alpha), self.bounds)
        )
        return self._record(student)

    def after_step(
        self, step: int, evaluate_student: Callable[[], dict[str, float]]
    ) -> dict[str, Any] | None:
        """Every `interval` steps under DDK: evaluate, update the weights. Returns what to log."""
        if not self.is_ddk or step % self.config.interval:
            return None
        assert self.teacher_ppl is not None
        student = evaluate_student()
        old = self.sampler.weights_dict()
        new = ddk_update(old, student, self.teacher_ppl, self.config.alpha)
        kept = self.config.smoothing
        self.sampler.set_weights(
            within_bounds({d: kept * old[d] + (1 - kept) * new[d] for d in old}, self.bounds)
        )
        self.updates += 1
        return self._record(student)

    def _record(self, student: dict[str, float]) -> dict[str, Any]:
        assert self.teacher_ppl is not None
        record: dict[str, Any] = {}
        for domain, weight in self.sampler.weights_dict().items():
            record[f"mixture/{domain}"] = weight
            record[f"ddk/student_ppl/{domain}"] = student[domain]
            record[f"ddk/teacher_ppl/{domain}"] = self.teacher_ppl[domain]
            record[f"ddk/ratio/{domain}"] = student[domain] / self.teacher_ppl[domain]
            record[f"ddk/min_weight/{domain}"], record[f"ddk/max_weight/{domain}"] = self.bounds[domain]
        return record

    def weights_text(self) -> str:
        """The current weights for a log line: `code 0.250, legal 0.250, ...`."""
        return ", ".join(f"{d} {w:.3f}" for d, w in self.sampler.weights_dict().items())

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "teacher_ppl": self.teacher_ppl,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.teacher_ppl = state.get("teacher_ppl")
        self.updates = int(state.get("updates", 0))
