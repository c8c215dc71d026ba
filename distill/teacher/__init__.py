"""Teacher sources: where a training run's teacher signal comes from (see `source.py`)."""

from __future__ import annotations

from distill.config import CampaignConfig
from distill.config.loss import LossConfig, LossWeightsConfig
from distill.data.prepared import PreparedData
from distill.engine.base import Engine
from distill.errors import DataError
from distill.teacher.cached import CachedSource, open_cache
from distill.teacher.online import OnlineSource
from distill.teacher.source import MicroBatch, ReadAhead, TeacherSource
from distill.training.objective import Objective

__all__ = ["CachedSource", "MicroBatch", "OnlineSource", "ReadAhead", "TeacherSource", "open_teacher_source"]


def open_teacher_source(config: CampaignConfig, data: PreparedData, engine: Engine) -> TeacherSource:
    """Collective: the configured teacher (`teacher.mode`) as a source for `engine`'s student."""
    teacher = config.teacher
    assert teacher is not None
    if teacher.mode == "online":
        model = engine.frozen_model(
            teacher.path,
            precision=teacher.precision,
            tokenizer_sha256=data.tokenizer_sha256,
            data_dir=data.directory,
        )
        if model.vocab_size != engine.vocab_size:
            raise DataError(
                f"teacher.path {teacher.path}: its vocabulary ({model.vocab_size}) differs from the "
                f"student's ({engine.vocab_size}); an online teacher must split the vocabulary like the student"
            )
        ce = Objective(
            LossConfig(weights=LossWeightsConfig(ce=1.0), chunk_tokens=config.loss.chunk_tokens),
            shard=engine.shard,
            total_steps=1,
        )
        return OnlineSource(
            model, ce, f"online teacher {teacher.path} ({model.num_parameters / 1e6:.1f}M parameters)"
        )
    assert config.cache is not None
    reader = open_cache(config.cache.dir, data, engine.vocab_size)
    return CachedSource(reader, active=engine.loss_rank, device=engine.device)
