"""Forward-only passes of a megatron-core GPTModel, and the one way a frozen teacher is built here.

`MegatronForward` runs micro-batches through the pipeline schedule and hands each loss-rank callback
the final hidden states `[b, s, h]` with the output layer's weight slice `[V/tp, h]` (the model emits
hidden states, `parallel.model.emit_hidden_states`), so every consumer applies the output layer itself:
the fused loss chunk by chunk, the cache writer all at once. `frozen_model` builds a teacher at a
parallel context: the online teacher inside the student's job and the cache stage's teacher on its own
layout both come from here (through `Engine.frozen_model` and `TeacherJob.frozen_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distill.engine.base import OutputFn
from distill.engine.megatron.weights import load_teacher
from distill.models.teacher import open_teacher
from parallel.distributed import ParallelContext
from parallel.model import ModelArch, emit_hidden_states, output_weight
from parallel.schedule import forward_only
from parallel.vocab import VocabShard


class MegatronForward:
    """Forward-only passes of a megatron-core model whose last stage emits hidden states."""

    def __init__(self, model: torch.nn.Module, module: Any, arch: ModelArch, shard: VocabShard) -> None:
        self.model, self.module = model, module  # what the schedule runs (maybe DDP), the GPTModel inside
        self.arch, self.shard = arch, shard
        self.num_parameters, self.vocab_size = arch.num_parameters(), arch.vocab_size

    def forward(self, micro_batches: Sequence[torch.Tensor], fn: OutputFn) -> list[Any]:
        def on_output(index: int, hidden: torch.Tensor, labels: torch.Tensor) -> Any:
            return fn(index, hidden, output_weight(self.module), labels)

        return forward_only(self.model, micro_batches, on_output, seq_length=micro_batches[0].shape[1] - 1)


def frozen_model(
    path: Path, ctx: ParallelContext, *, precision: str, tokenizer_sha256: str, data_dir: Path
) -> MegatronForward:
    """The teacher at `path` (checked to share the data's tokenizer) as this rank's shard at `ctx`."""
    weights = open_teacher(path, tokenizer_sha256=tokenizer_sha256, data_dir=data_dir)
    model = load_teacher(weights, ctx, precision)
    emit_hidden_states(model)
    arch = weights.megatron_arch("teacher.path")
    shard = VocabShard.of(arch.vocab_size, ctx.tp_rank, ctx.dims.tp, ctx.tp_group)
    return MegatronForward(model, model, arch, shard)
