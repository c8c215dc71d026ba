"""The campaign config tree: one validated schema, one section per component.

Every section here changes what a stage does; later stages (teacher, cache, loss, mixture, slurm)
add their sections to `CampaignConfig` when they exist. Unknown keys are errors (`extra="forbid"`),
so a typo never silently falls back to a default. Relative paths are resolved against the current
working directory when the config is loaded, so the resolved config written next to every artifact
is self-contained. Sections live in `data.py` and `train.py`; this module assembles the tree.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from distill.config.base import AbsPath, Section
from distill.config.data import (
    DataConfig,
    DemoCorpusConfig,
    DomainConfig,
    SourceConfig,
    TokenizerConfig,
    TokenizerTrainConfig,
)
from distill.config.train import (
    CacheConfig,
    CheckpointConfig,
    ExportConfig,
    LoggingConfig,
    ParallelConfig,
    StudentArchConfig,
    StudentConfig,
    TeacherConfig,
    TrainingConfig,
)

__all__ = [
    "CacheConfig",
    "CampaignConfig",
    "CheckpointConfig",
    "DataConfig",
    "DemoCorpusConfig",
    "DomainConfig",
    "ExportConfig",
    "LoggingConfig",
    "ParallelConfig",
    "RunConfig",
    "Section",
    "SourceConfig",
    "StudentArchConfig",
    "StudentConfig",
    "TeacherConfig",
    "TokenizerConfig",
    "TokenizerTrainConfig",
    "TrainingConfig",
]


class RunConfig(Section):
    name: str = Field(min_length=1, description="Campaign name, shown in logs and manifests.")
    dir: AbsPath = Field(
        description="Root directory of the campaign's outputs; the resolved config lands here."
    )


class CampaignConfig(Section):
    """The whole campaign. Stages read their own section; nothing reads a global.

    `data` is always there; `student`, `parallel`, `training`, `checkpoint` and `logging` come together
    (a campaign that trains), `export` only with them.
    """

    run: RunConfig
    data: DataConfig
    student: StudentConfig | None = None
    parallel: ParallelConfig = ParallelConfig()
    training: TrainingConfig | None = None
    checkpoint: CheckpointConfig | None = None
    logging: LoggingConfig | None = None
    export: ExportConfig | None = None
    teacher: TeacherConfig | None = None
    cache: CacheConfig | None = None

    @model_validator(mode="after")
    def _training_sections_together(self) -> CampaignConfig:
        trains = {
            "student": self.student,
            "training": self.training,
            "checkpoint": self.checkpoint,
            "logging": self.logging,
        }
        present = [k for k, v in trains.items() if v is not None]
        if present and len(present) != len(trains):
            missing = [k for k in trains if k not in present]
            raise ValueError(
                f"a campaign that trains needs {', '.join(trains)}; missing: {', '.join(missing)}"
            )
        if self.export is not None and not present:
            raise ValueError("`export` needs the training sections (student, training, checkpoint, logging)")
        if (self.cache is None) != (self.teacher is None):
            raise ValueError("`cache` and `teacher` come together: the cache stage runs the teacher")
        return self

    @property
    def trains(self) -> bool:
        return self.training is not None
