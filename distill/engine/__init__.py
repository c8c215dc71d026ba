"""Engines: what owns the student model and its parallelism (see `base.py` for the seam)."""

from __future__ import annotations

from typing import Any

from distill.config import CampaignConfig
from distill.engine.base import Engine, ForwardModel, LossFn, OutputFn, TeacherJob

__all__ = ["Engine", "ForwardModel", "LossFn", "OutputFn", "TeacherJob", "build_engine", "teacher_job"]


def build_engine(config: CampaignConfig, ctx: Any = None) -> Engine:
    """The engine `config.engine` names; joins the world unless `ctx` (megatron: a built parallel
    context, for tests) is given. Each engine's library is imported only when it is built."""
    if config.engine == "deepspeed":
        from distill.engine.zero.engine import ZeroEngine

        return ZeroEngine(config)
    from distill.engine.megatron.engine import MegatronEngine

    return MegatronEngine(config, ctx)


def teacher_job(config: CampaignConfig, ctx: Any = None) -> TeacherJob:
    """The teacher of `config` on its own layout (`teacher.parallel`) under `teacher.engine`, for the
    cache stage; joins the world unless `ctx` (a built megatron parallel context) is given."""
    assert config.teacher is not None
    if config.teacher.engine == "megatron":  # the one the schema accepts so far
        from distill.engine.megatron.teacher import MegatronTeacherJob

        return MegatronTeacherJob(config.teacher.layout, ctx)
    raise ValueError(f"teacher.engine {config.teacher.engine!r} has no teacher job")
