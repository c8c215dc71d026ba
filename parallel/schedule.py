"""Every pass of a megatron-core GPTModel over token micro-batches, through the pipeline schedules.

Two entry points, one per kind of pass, both over micro-batches of prepared sequences `[mb, s + 1]`
(inputs `[:, :-1]`, labels `[:, 1:]`):

- `forward_backward`: a training step. The last stage calls `on_output(index, output, labels)`,
  which returns megatron's loss contract `(loss_sum, num_tokens, report)`; gradients are of the
  token-mean loss over the whole global batch (megatron's `calculate_per_token_loss`).
- `forward_only`: every pass without gradients (the cache writer's teacher, the online teacher, held-
  out evaluation, cache inspection). The last stage calls `on_output(index, output, labels)` and keeps
  whatever it returns; the schedule gets a zero loss. Micro-batches of different sizes are run in
  groups of equal size (the pipeline sends fixed-shape activations between stages).

`output` is what the model's last stage returns: logits `[mb, s, V/tp]`, or final hidden states
`[mb, s, h]` for a model whose output layer the fused loss applies (`model.emit_hidden_states`).
`forward_backward` returns the reports in micro-batch order on the last stage (empty elsewhere);
`forward_only` one result per micro-batch in the given order on the last stage (None elsewhere). Its
callbacks run group by group, larger micro-batches first: in index order when only the last
micro-batch is short (what `Tensor.split` gives), which the cache writer relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

OnOutput = Callable[[int, torch.Tensor, torch.Tensor], Any]  # (index, output, labels [mb, s]) -> result


def _run(
    model: torch.nn.Module,
    micro_batches: Sequence[tuple[int, torch.Tensor]],
    on_output: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, Any]],
    *,
    seq_length: int,
    forward_only: bool,
) -> list[Any]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = iter(micro_batches)

    def step(data_iterator: Any, module: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        index, tokens = next(data_iterator)
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
        output = module(inputs, positions, attention_mask=None)  # last stage: [mb, s, V/tp] or [mb, s, h]
        return output, lambda out: on_output(index, out, labels)

    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=batches,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=len(micro_batches[0][1]),
        forward_only=forward_only,
    )


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[torch.Tensor],
    on_output: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, Any]],
    *,
    seq_length: int,
) -> list[Any]:
    """Forward and backward over equal-size `micro_batches`; the last stage gets each report."""
    return _run(model, list(enumerate(micro_batches)), on_output, seq_length=seq_length, forward_only=False)


def forward_only(
    model: torch.nn.Module, micro_batches: Sequence[torch.Tensor], on_output: OnOutput, *, seq_length: int
) -> list[Any]:
    """Forward without gradients (eval mode, restored after); `on_output`'s results on the last stage."""
    results: list[Any] = [None] * len(micro_batches)

    def keep(
        index: int, output: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        results[index] = on_output(index, output, labels)
        return output.sum() * 0.0, torch.tensor(1, dtype=torch.int, device=output.device), {}

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for size in sorted({len(m) for m in micro_batches}, reverse=True):
                group = [(i, m) for i, m in enumerate(micro_batches) if len(m) == size]
                _run(model, group, keep, seq_length=seq_length, forward_only=True)
    finally:
        model.train(was_training)
    return results
