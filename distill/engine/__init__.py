"""Engines: what owns the student model and its parallelism (see `base.py` for the seam)."""

from __future__ import annotations

from typing import Any

from distill.config import CampaignConfig
from distill.engine.base import Engine, ForwardModel, LossFn, OutputFn

__all__ = ["Engine", "ForwardModel", "LossFn", "OutputFn", "build_engine"]


def build_engine(config: CampaignConfig, ctx: Any = None) -> Engine:
    """The engine `config.engine` names; joins the world unless `ctx` (megatron: a built parallel
    context, for tests) is given. Each engine's library is imported only when it is built."""
    if config.engine == "deepspeed":
        from distill.engine.zero.engine import ZeroEngine

        return ZeroEngine(config)
    from distill.engine.megatron.engine import MegatronEngine

    return MegatronEngine(config, ctx)
