"""Teacher sources: where a training run's teacher signal comes from (see `source.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from distill.config import CampaignConfig
from distill.data.prepared import PreparedData
from distill.engine.base import Engine
from distill.errors import DataError
from distill.hub import ModelLocation
from distill.teacher.aligned import check_pairing, open_aligned_cache
from distill.teacher.aligned_cached import AlignedCachedSource
from distill.teacher.aligned_online import AlignedOnlineSource
from distill.teacher.cached import CachedSource, open_cache
from distill.teacher.online import OnlineSource
from distill.teacher.source import MicroBatch, ReadAhead, TeacherSource

if TYPE_CHECKING:  # the CE objective is passed in; sources do not build objectives
    from distill.training.objective import Objective

__all__ = [
    "AlignedCachedSource",
    "AlignedOnlineSource",
    "CachedSource",
    "MicroBatch",
    "OnlineSource",
    "ReadAhead",
    "TeacherSource",
    "open_teacher_source",
]


def open_teacher_source(
    config: CampaignConfig, data: PreparedData, engine: Engine, cross_entropy: Objective
) -> TeacherSource:
    """Collective: the configured teacher (`teacher.mode`) as a source for `engine`'s student;
    `cross_entropy` (a CE-only objective on the student's vocabulary shard) scores a live teacher."""
    teacher = config.teacher
    assert teacher is not None
    check_pairing(config, data)
    if data.paired:  # a teacher with another tokenizer: ULD over aligned positions
        if teacher.mode == "online":
            assert data.teacher_tokenizer_sha256 is not None
            model = engine.frozen_model(
                teacher.path,
                precision=teacher.precision,
                tokenizer_sha256=data.teacher_tokenizer_sha256,
                data_dir=data.directory,
            )
            return AlignedOnlineSource(config, data, engine, model, _tokenizer_dir(config, data))
        assert config.cache is not None
        reader = open_aligned_cache(config.cache.dir, data)
        return AlignedCachedSource(config, data, engine, reader, _tokenizer_dir(config, data))
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
        return OnlineSource(
            model,
            cross_entropy,
            f"online teacher {teacher.path} ({model.num_parameters / 1e6:.1f}M parameters)",
        )
    assert config.cache is not None
    reader = open_cache(config.cache.dir, data, engine.vocab_size)
    return CachedSource(reader, active=engine.loss_rank, device=engine.device)


def _tokenizer_dir(config: CampaignConfig, data: PreparedData) -> ModelLocation:
    """The teacher's tokenizer directory: `teacher.tokenizer`, else the one the data was paired with."""
    assert config.teacher is not None
    return config.teacher.tokenizer or Path(data.manifest["teacher_tokenizer"]["path"])
