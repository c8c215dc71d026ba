"""Engines: what owns the student model and its parallelism (see `base.py` for the seam)."""

from __future__ import annotations

from typing import Any

from distill.config import CampaignConfig
from distill.engine.base import Engine, ForwardModel, LossFn, OutputFn, TeacherJob

__all__ = [
    "Engine",
    "ForwardModel",
    "LossFn",
    "OutputFn",
    "TeacherJob",
    "build_engine",
    "teacher_engine",
    "teacher_job",
]


def build_engine(config: CampaignConfig, ctx: Any = None) -> Engine:
    """The engine `config.engine` names; joins the world unless `ctx` (megatron: a built parallel
    context, for tests) is given. Each engine's library is imported only when it is built."""
    if config.engine == "deepspeed":
        from distill.engine.zero.engine import ZeroEngine

        return ZeroEngine(config)
    from distill.engine.megatron.engine import MegatronEngine

    return MegatronEngine(config, ctx)


def teacher_engine(config: CampaignConfig) -> str:
    """What runs the cache stage's teacher: `teacher.engine`, where `auto` is megatron-core for a model it
    has a mapping for (llama, mistral, qwen2, qwen3, distillery checkpoints) and transformers otherwise."""
    assert config.teacher is not None
    if config.teacher.engine != "auto":
        return config.teacher.engine
    from distill.models.weights import find_weights

    return "megatron" if find_weights(config.teacher.path).megatron_ready else "transformers"


def teacher_job(config: CampaignConfig, ctx: Any = None) -> TeacherJob:
    """The teacher of `config` on its own layout (`teacher.parallel`) under `teacher_engine(config)`, for
    the cache stage; joins the world unless `ctx` (a built megatron parallel context) is given."""
    assert config.teacher is not None
    engine = teacher_engine(config)
    if engine == "transformers":
        from distill.engine.hf.teacher import TransformersTeacherJob

        return TransformersTeacherJob(config.teacher.layout)
    if engine == "deepspeed":
        from distill.engine.zero.teacher import ZeroTeacherJob

        return ZeroTeacherJob(config)
    from distill.engine.megatron.teacher import MegatronTeacherJob

    return MegatronTeacherJob(config.teacher.layout, ctx)
