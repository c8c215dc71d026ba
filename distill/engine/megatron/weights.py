"""Weights into this rank's shard of a megatron-core GPTModel: the student's start, a frozen teacher.

`load_weights` fills every parameter from an HF directory (only this rank's slices of the safetensors
are read) or a distillery checkpoint (`dist_checkpointing` reshards it to this layout). `load_teacher`
builds a model for a teacher's weights and loads it, in eval mode. Students, online teachers, the cache
writer's teacher, import/export and cache inspection all load through here.
"""

from __future__ import annotations

from typing import Any

import torch

from distill.engine.megatron.checkpoint import load_checkpoint
from distill.models.hf_io import HFCheckpoint
from distill.models.hf_layout import Shard
from distill.models.weights import Weights
from parallel.distributed import ParallelContext
from parallel.model import build_gpt, precision_dtype


def load_weights(model: torch.nn.Module, weights: Weights, ctx: ParallelContext) -> None:
    """Collective: fill this rank's shard of `model` (built for `weights.arch` at `ctx`'s layout)."""
    if weights.kind == "hf":
        HFCheckpoint(weights.directory).load_into(
            model, Shard(weights.megatron_arch("model"), ctx.dims, ctx.tp_rank, ctx.pp_rank, ctx.ep_rank)
        )
    else:
        load_checkpoint(weights.directory, model=model, optimizer=None, ctx=ctx)


def load_teacher(weights: Weights, ctx: ParallelContext, precision: str) -> Any:
    """This rank's shard of the teacher (layers of its pipeline stage, vocabulary slice), eval mode."""
    arch = weights.megatron_arch("teacher.path")
    model = build_gpt(arch, ctx.dims, pp_rank=ctx.pp_rank, dtype=precision_dtype(precision))
    load_weights(model, weights, ctx)
    return model.eval()
