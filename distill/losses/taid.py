"""TAID's adaptive interpolation parameter tau (Shing et al. 2025), advanced once per optimizer step.

The TAID target is `p_tau = softmax((1 - tau) sg(z_s) + tau z_t)`: it starts near the student itself and
moves toward the teacher. tau rises at least linearly from `tau_start` to `tau_end` over the run, and
faster while the TAID loss keeps improving (momentum of the relative improvement, squashed by a
sigmoid, scaled by the remaining distance `1 - tau`):

    rel   = (L_prev - L) / (L_prev + 1e-15)
    m     = beta * m + (1 - beta) * rel
    delta = alpha * sigmoid(m) * (1 - tau)
    tau   = min(tau_end, max(tau_lin(step), tau + delta))

On the first update there is no previous loss: it only records L (m stays 0) and applies the linear
floor. `tau`, `m` and `L_prev` are training state, saved in every checkpoint, so a resumed run
continues with exactly the tau the uninterrupted run would have had.
"""

from __future__ import annotations

import math
from typing import Any

from distill.config.loss import TaidConfig


class TaidSchedule:
    def __init__(self, config: TaidConfig, total_steps: int) -> None:
        self.config = config
        self.total_steps = total_steps
        self.tau = config.tau_start
        self.momentum = 0.0
        self.prev_loss: float | None = None

    def update(self, loss: float, step: int) -> float:
        """Advance after optimizer step `step` (1-based) whose mean TAID loss was `loss`; returns tau."""
        c = self.config
        tau_linear = c.tau_start + (c.tau_end - c.tau_start) * min(step / self.total_steps, 1.0)
        candidate = self.tau
        if self.prev_loss is not None:
            relative = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            self.momentum = c.beta * self.momentum + (1 - c.beta) * relative
            candidate = self.tau + c.alpha / (1 + math.exp(-self.momentum)) * (1 - self.tau)
        self.tau = min(c.tau_end, max(tau_linear, candidate))
        self.prev_loss = loss
        return self.tau

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau = float(state["tau"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
