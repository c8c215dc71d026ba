"""TAID's tau schedule against the formula written out directly, and its checkpointed state."""

from __future__ import annotations

import math

import pytest

from distill.config.loss import TaidConfig
from distill.losses.taid import TaidSchedule


def reference_taus(losses: list[float], total: int, c: TaidConfig) -> list[float]:
    tau, m, prev, out = c.tau_start, 0.0, None, []
    for step, loss in enumerate(losses, start=1):
        linear = c.tau_start + (c.tau_end - c.tau_start) * step / total
        candidate = tau
        if prev is not None:
            rel = (prev - loss) / (prev + 1e-15)
            m = c.beta * m + (1 - c.beta) * rel
            candidate = tau + c.alpha * (1 / (1 + math.exp(-m))) * (1 - tau)
        tau = min(c.tau_end, max(linear, candidate))
        prev = loss
        out.append(tau)
    return out


# a long run so that the adaptive term, not the linear floor, decides tau (large alpha makes it visible)
CONFIG = TaidConfig(tau_start=0.2, tau_end=1.0, alpha=0.05, beta=0.9)
LOSSES = [5.0 * 0.97**i + (0.3 if i % 7 == 0 else 0.0) for i in range(60)]


def test_tau_follows_the_formula_and_the_adaptive_term_matters():
    schedule = TaidSchedule(CONFIG, total_steps=1000)
    taus = [schedule.update(loss, step) for step, loss in enumerate(LOSSES, start=1)]
    assert taus == pytest.approx(reference_taus(LOSSES, 1000, CONFIG), abs=1e-12)
    linear_floor = CONFIG.tau_start + (CONFIG.tau_end - CONFIG.tau_start) * len(LOSSES) / 1000
    assert taus[-1] > linear_floor + 0.1  # the momentum-driven increase, not the floor


def test_restored_state_continues_exactly():
    full = TaidSchedule(CONFIG, total_steps=1000)
    expected = [full.update(loss, step) for step, loss in enumerate(LOSSES, start=1)]
    first = TaidSchedule(CONFIG, total_steps=1000)
    for step, loss in enumerate(LOSSES[:25], start=1):
        first.update(loss, step)
    resumed = TaidSchedule(CONFIG, total_steps=1000)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.update(loss, step) for step, loss in enumerate(LOSSES[25:], start=26)] == expected[25:]
    fresh = TaidSchedule(CONFIG, total_steps=1000)  # without momentum and previous loss it would differ
    fresh.tau = first.tau
    assert [fresh.update(loss, step) for step, loss in enumerate(LOSSES[25:], start=26)] != expected[25:]
