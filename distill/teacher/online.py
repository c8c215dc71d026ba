"""The live teacher: a second model in the same job, run forward-only before the student's step.

The engine builds it sharded like the student (megatron-core: same tp and pp, each stage holds its
slice of both) and without optimizer state. Its final hidden states (not logits) reach the loss ranks
with its output-layer slice; the fused loss applies that layer chunk by chunk, so the teacher never
holds a `[tokens, V]` tensor either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distill.cache.reader import SequenceKey
from distill.engine.base import ForwardModel
from distill.losses.signal import LiveSignal, TeacherSignal
from distill.teacher.source import MicroBatch

if TYPE_CHECKING:  # the CE objective is passed in; sources do not build objectives
    from distill.training.objective import Objective


class OnlineSource:
    def __init__(self, model: ForwardModel, cross_entropy: Objective, description: str) -> None:
        self.model, self.ce, self.description = model, cross_entropy, description
        self.arch = model.arch  # its forward pass is part of every step (model FLOPs)

    def signals(self, micro_batches: list[MicroBatch]) -> list[TeacherSignal | None]:
        def live(index: int, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> LiveSignal:
            return LiveSignal(hidden.reshape(-1, hidden.shape[-1]), weight)  # [b * s, h_t], [V/tp, h_t]

        return self.model.forward([m.tokens for m in micro_batches], live)

    def read_ahead(self, keys: list[list[SequenceKey]]) -> None:
        """Nothing to prepare: the teacher runs on the step's own tokens."""

    def cross_entropy(self, micro_batches: list[MicroBatch]) -> list[tuple[float, int] | None]:
        return self.ce.cross_entropy(self.model, micro_batches)

    def close(self) -> None:
        """The model goes with the engine's process group."""
