"""The campaign config tree: one validated schema, one section per component.

Every section here changes what a stage does; later stages (teacher, cache, loss, mixture, slurm)
add their sections to `CampaignConfig` when they exist. Unknown keys are errors (`extra="forbid"`),
so a typo never silently falls back to a default. Relative paths are resolved against the current
working directory when the config is loaded, so the resolved config written next to every artifact
is self-contained. Sections live in `data.py` and `train.py`; this module assembles the tree.
"""

from __future__ import annotations

from typing import Any, Literal

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
from distill.config.handoff import BaselineConfig, EvalConfig
from distill.config.loss import CROSS_TOKENIZER_TERMS, LossConfig, LossWeightsConfig, TaidConfig
from distill.config.prune import CorrectConfig, PruneConfig, resolve_correction
from distill.config.slurm import SlurmConfig, SlurmStageConfig
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
from distill.config.zero import OffloadConfig, ZeroConfig

__all__ = [
    "BaselineConfig",
    "EvalConfig",
    "CacheConfig",
    "CampaignConfig",
    "CheckpointConfig",
    "CorrectConfig",
    "DataConfig",
    "DemoCorpusConfig",
    "DomainConfig",
    "ExportConfig",
    "LoggingConfig",
    "LossConfig",
    "LossWeightsConfig",
    "OffloadConfig",
    "ParallelConfig",
    "PruneConfig",
    "RunConfig",
    "Section",
    "SlurmConfig",
    "SlurmStageConfig",
    "SourceConfig",
    "StudentArchConfig",
    "StudentConfig",
    "TaidConfig",
    "TeacherConfig",
    "ZeroConfig",
    "TokenizerConfig",
    "TokenizerTrainConfig",
    "TrainingConfig",
]


class RunConfig(Section):
    name: str = Field(min_length=1, description="Campaign name, shown in logs and manifests.")
    dir: AbsPath = Field(
        description="Root directory of the campaign's outputs; the resolved config lands here."
    )
    nproc: int | None = Field(
        default=None,
        gt=0,
        description="Processes of a local run's train stages (`distillery run`; --nproc overrides); "
        "default parallel.tp x parallel.pp. Data parallelism is what the world leaves after tp x pp.",
    )


class CampaignConfig(Section):
    """The whole campaign. Stages read their own section; nothing reads a global.

    `data` is always there; `student`, `parallel`, `training`, `checkpoint` and `logging` come together
    (a campaign that trains), `export` only with them.
    """

    run: RunConfig
    data: DataConfig
    student: StudentConfig | None = None
    engine: Literal["megatron", "deepspeed"] = Field(
        default="megatron",
        description="What shards the student: megatron-core (tp x pp x dp) or DeepSpeed ZeRO (HF modules).",
    )
    parallel: ParallelConfig = ParallelConfig()
    deepspeed: ZeroConfig | None = Field(
        default=None, description="engine deepspeed: ZeRO stage, offload (defaults when absent)."
    )
    training: TrainingConfig | None = None
    checkpoint: CheckpointConfig | None = None
    logging: LoggingConfig | None = None
    export: ExportConfig | None = None
    teacher: TeacherConfig | None = None
    cache: CacheConfig | None = None
    loss: LossConfig = LossConfig()
    baseline: BaselineConfig | None = None
    eval: EvalConfig | None = None
    slurm: SlurmConfig | None = None
    correct: CorrectConfig | None = Field(
        default=None, description="Fine-tune the teacher on the prepared data first (Minitron's correction)."
    )
    prune: PruneConfig | None = Field(
        default=None, description="Start the student from the teacher pruned to student.arch (Minitron)."
    )

    @model_validator(mode="before")
    @classmethod
    def _corrected_teacher(cls, raw: Any) -> Any:
        return resolve_correction(raw) if isinstance(raw, dict) else raw

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
        if self.baseline is not None and not present:
            raise ValueError(
                "`baseline` needs the training sections (student, training, checkpoint, logging)"
            )
        self._check_engine()
        self._check_minitron()
        self._check_teacher()
        self._check_loss()
        self._check_slurm()
        return self

    def stage_ranks(self, stage: str) -> int:
        """Ranks a multi-process stage needs at least: the teacher's tp x pp (x ep) for cache, prune, and
        to correct it (its fine-tune runs at the teacher's layout), the student's tp x pp to train."""
        if stage == "cache":
            layout = self.teacher.layout if self.teacher is not None else None
            return layout.tp * layout.pp * layout.ep if layout is not None else 1
        if stage in ("prune", "correct"):
            layout = self.teacher.layout if self.teacher is not None else None
            return layout.tp * layout.pp if layout is not None else 1
        if stage in ("train", "baseline"):
            return self.run.nproc or self.parallel.tp * self.parallel.pp
        return 1

    def ranks_per_node(self, stage: str) -> int:
        """Ranks a Slurm job of `stage` starts per node: slurm.stages.<stage>.procs_per_node, else its GPUs
        per node, else (CPU nodes) the stage's tp x pp."""
        resources = self.slurm.stage(stage) if self.slurm is not None else SlurmStageConfig()
        return resources.procs_per_node or resources.gpus_per_node or self.stage_ranks(stage)

    def _check_slurm(self) -> None:
        if self.slurm is None:
            return
        for stage in ("cache", "train", "baseline"):
            resources = self.slurm.stage(stage)
            unit = self.stage_ranks(stage) if stage == "cache" else self.parallel.tp * self.parallel.pp
            per_node = self.ranks_per_node(stage)
            world = resources.nodes * per_node
            if world % unit:
                raise ValueError(
                    f"slurm.stages.{stage}: {resources.nodes} node(s) x {per_node} rank(s) = {world} ranks, "
                    f"not a multiple of the {'teacher' if stage == 'cache' else 'student'}'s tp x pp = {unit}"
                )

    def _check_engine(self) -> None:
        if self.parallel.ep != 1:
            raise ValueError(
                f"parallel.ep is {self.parallel.ep}: expert parallelism splits a mixture-of-experts teacher's "
                "experts (teacher.parallel.ep); students are dense (MoE students are out of scope)"
            )
        if self.engine == "megatron":
            if self.deepspeed is not None:
                raise ValueError(
                    "the `deepspeed` section is read by engine: deepspeed only (engine is megatron)"
                )
            return
        if self.parallel.tp != 1 or self.parallel.pp != 1:
            raise ValueError(
                f"engine deepspeed shards the student by ZeRO over data parallel: parallel.tp and parallel.pp "
                f"must be 1 (they are {self.parallel.tp} and {self.parallel.pp}); use engine megatron for tp/pp"
            )
        if self.training is not None and self.training.distributed_optimizer:
            raise ValueError(
                "training.distributed_optimizer is megatron-core's optimizer (engine megatron); under engine "
                "deepspeed ZeRO already shards the optimizer state (deepspeed.zero_stage)"
            )

    def _check_minitron(self) -> None:
        trains = self.student is not None
        if self.correct is not None:
            if self.teacher is None:
                raise ValueError("`correct` needs a `teacher` section: it fine-tunes the teacher")
            if not trains:
                raise ValueError(
                    "`correct` needs the training sections (student, training, checkpoint, logging): the "
                    "correction runs the training loop, with training's seed and schedule"
                )
        if self.prune is None:
            return
        if self.teacher is None:
            raise ValueError("`prune` needs a `teacher` section: the student is cut from the teacher")
        if self.student is None or self.student.arch is None:
            raise ValueError(
                "`prune` needs student.arch (the shape the teacher is pruned to) and student.init_dir (where "
                "the pruned weights go), not student.init"
            )

    def _check_teacher(self) -> None:
        teacher, cache = self.teacher, self.cache
        if cache is not None and teacher is None:
            raise ValueError("`cache` needs a `teacher` section: the cache stage runs the teacher")
        if teacher is None:
            return
        layout = teacher.layout
        if teacher.engine == "transformers" and layout.pp != 1:
            raise ValueError(
                f"teacher.parallel.pp is {layout.pp}: teacher.engine transformers shards the teacher by tensor "
                "parallelism only (pp 1); raise teacher.parallel.tp, or use teacher.engine megatron for pp"
            )
        if layout.ep != 1 and teacher.engine in ("transformers", "deepspeed"):
            raise ValueError(
                f"teacher.parallel.ep is {layout.ep}: expert parallelism is megatron-core's "
                f"(teacher.engine megatron, or auto for mixtral / qwen3_moe), not {teacher.engine}'s"
            )
        if teacher.engine == "deepspeed" and (layout.tp, layout.pp) != (1, 1):
            raise ValueError(
                f"teacher.parallel (tp {layout.tp}, pp {layout.pp}): teacher.engine deepspeed partitions the "
                "teacher by ZeRO-3 over every rank (tp 1, pp 1); use teacher.engine transformers for tp"
            )
        if teacher.mode == "cached" and cache is None:
            raise ValueError(
                "teacher.mode is 'cached' (the default), which needs a `cache` section; "
                "set teacher.mode: online to run the teacher live during training"
            )
        if teacher.mode == "online":
            if teacher.engine != "auto":
                raise ValueError(
                    f"teacher.engine {teacher.engine!r} chooses what runs the cache stage's teacher; an online "
                    "teacher runs in the student's engine (megatron-core when it maps the teacher, else the "
                    "Hugging Face module): remove teacher.engine"
                )
            if cache is not None:
                raise ValueError(
                    "teacher.mode 'online' trains against the live teacher: remove the `cache` section "
                    "or set teacher.mode: cached"
                )
            if not self.trains:
                raise ValueError("teacher.mode 'online' needs the training sections (student, training, ...)")
            if teacher.parallel is not None and teacher.parallel != self.parallel:
                raise ValueError(
                    f"teacher.parallel (tp {teacher.parallel.tp}, pp {teacher.parallel.pp}, ep {teacher.parallel.ep}) "
                    f"differs from parallel (tp {self.parallel.tp}, pp {self.parallel.pp}, ep {self.parallel.ep}): "
                    "an online teacher is sharded like the student (no expert parallelism); remove teacher.parallel"
                )

    def _check_loss(self) -> None:
        if self.trains and self.data.mixture.type == "ddk":
            if self.teacher is None:
                raise ValueError(
                    "data.mixture.type ddk needs a `teacher` section: DDK weighs domains by the "
                    "student/teacher held-out perplexity ratio"
                )
            if self.data.heldout_sequences == 0:
                raise ValueError(
                    "data.mixture.type ddk needs held-out sequences: data.heldout_sequences is 0"
                )
        kd = self.loss.weights.kd_terms()
        if not kd or not self.trains:
            return
        names = ", ".join(f"loss.weights.{name}" for name in kd)
        if self.teacher is None:
            raise ValueError(
                f"{names} need a teacher: add a `teacher` section (and a `cache`, or mode online)"
            )
        cross = [f"loss.weights.{name}" for name in kd if name in CROSS_TOKENIZER_TERMS]
        if cross:
            same_vocab = [f"loss.weights.{name}" for name in kd if name not in CROSS_TOKENIZER_TERMS]
            if same_vocab:
                raise ValueError(
                    f"{', '.join(cross)} cannot be combined with {', '.join(same_vocab)}: those compare the two "
                    "distributions id by id, which needs a teacher with the student's tokenizer"
                )
            if "projected_kl" in kd and self.loss.uld.alignment == "positional":
                raise ValueError(
                    "loss.weights.projected_kl needs loss.uld.alignment byte_offset: the projection reads the "
                    "teacher's next-token distribution as the student's where both next tokens start at the "
                    "same byte, which positional pairing does not give"
                )
            if self.cache is not None and self.cache.mode == "sampled":
                raise ValueError(
                    f"{', '.join(cross)} need the top-k cache over the teacher's sequences: a sampled (RS-KD) cache "
                    "holds draws only; use cache.mode topk or teacher.mode online"
                )
        if self.teacher.mode == "online" or self.cache is None:
            return
        if self.cache.mode == "sampled":
            other = [f"loss.weights.{name}" for name in kd if name != "forward_kl"]
            if other:
                raise ValueError(
                    f"{', '.join(other)}: a sampled (RS-KD) cache holds draws, not a distribution; it supports "
                    "forward_kl only (use cache.mode topk or teacher.mode online)"
                )
            if self.loss.temperature != 1.0:
                raise ValueError(
                    f"loss.temperature is {self.loss.temperature}, but RS-KD draws are taken at temperature 1"
                )
        elif self.loss.temperature != self.cache.temperature:
            raise ValueError(
                f"loss.temperature ({self.loss.temperature}) differs from cache.temperature "
                f"({self.cache.temperature}) the teacher's log-probs were stored at"
            )

    @property
    def trains(self) -> bool:
        return self.training is not None
