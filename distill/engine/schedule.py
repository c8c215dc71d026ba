"""The optimizer settings both engines share: the learning-rate schedule and AdamW's parameter groups.

An engine sets `lr_at(step)` on its optimizer's groups before each step, so a run's schedule is the same
under megatron-core (distillery's AdamW or megatron-core's DistributedOptimizer) and DeepSpeed ZeRO.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from distill.config.schema import TrainingConfig


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine / WSD / constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = 1.0 - cfg.decay_fraction  # wsd: warmup, stable at lr, linear decay to min_lr at the end
    if progress <= decay_start:
        return cfg.lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * (progress - decay_start) / cfg.decay_fraction


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # a ZeRO-3 partitioned parameter is an empty 1-d placeholder: its real shape is `ds_shape`
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim < 2 or "layernorm" in name or name.endswith(".bias")


def adamw_param_groups(
    named_parameters: Iterable[tuple[str, torch.Tensor]], cfg: TrainingConfig
) -> list[dict[str, Any]]:
    """AdamW's two groups, the same for both engines: weight decay on matrices, none on norms and
    biases (by name and shape; pass only the tensors that train)."""
    decay, plain = [], []
    for name, param in named_parameters:
        (plain if _no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
