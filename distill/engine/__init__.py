"""Engines: what owns the student model and its parallelism (see `base.py` for the seam)."""

from __future__ import annotations

from typing import Any

from distill.config import CampaignConfig
from distill.engine.base import Engine, ForwardModel, LossFn, OutputFn

__all__ = ["Engine", "ForwardModel", "LossFn", "OutputFn", "build_engine"]


def build_engine(config: CampaignConfig, ctx: Any = None) -> Engine:
    """The engine for `config` (megatron-core today); joins the world unless `ctx` is given."""
    from distill.engine.megatron import MegatronEngine  # megatron-core: imported only when training

    return MegatronEngine(config, ctx)
