"""One training or evaluation step through megatron-core's pipeline schedules.

`run_schedule` picks megatron-core's schedule for the layout (no pipelining, or 1F1B across pipeline
stages), feeds it this rank's micro-batches and returns what the last stage's loss function reported
per micro-batch. The loss itself is pluggable: the caller's `forward_step(batch, model)` returns the
model output and a function of it that gives `(loss_sum, num_tokens, report)`; gradients are of the
token-mean loss over the whole global batch (megatron's `calculate_per_token_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def run_schedule(
    model: torch.nn.Module,
    micro_batches: Sequence[Any],
    forward_step: Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable]],
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> list[dict[str, torch.Tensor]]:
    """Run forward (and backward unless `forward_only`) over `micro_batches`; last stage gets the reports."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = iter(micro_batches)

    def step(data_iterator: Any, module: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        return forward_step(next(data_iterator), module)

    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=batches,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
