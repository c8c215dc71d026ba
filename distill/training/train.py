"""`distillery train`: build the engine, run the distillation loop over it, close."""

from __future__ import annotations

from typing import Any

from distill.config import CampaignConfig
from distill.engine import build_engine
from distill.errors import DataError
from distill.training.loop import DistillLoop, StepResult


def build_loop(config: CampaignConfig, ctx: Any = None) -> DistillLoop:
    """The loop over this config's engine (`ctx`: an already built parallel context, for tests)."""
    if not config.trains:
        raise DataError("this config has no training sections (student, training, checkpoint, logging)")
    return DistillLoop(config, build_engine(config, ctx))


def train(config: CampaignConfig) -> list[StepResult]:
    """The `train` stage on this process (launched once per rank by torchrun or `distillery launch`)."""
    if not config.trains:
        raise DataError("this config has no training sections (student, training, checkpoint, logging)")
    engine = build_engine(config)
    try:
        return DistillLoop(config, engine).run()
    finally:
        engine.close()
