"""The `slurm` config section: what `distillery submit` asks of the cluster for each stage.

Every value here ends up in a generated sbatch script, so each is validated for what Slurm accepts
(times, memory sizes, names) and must not carry whitespace or shell syntax: a value that could change
the script's meaning is rejected with the key that holds it. Paths and names that do reach a shell line
are also quoted by the renderer (`launcher/slurm/render.py`). The one exception is `setup`: lines of
shell the user writes on purpose (module loads, a venv, a container entry), copied verbatim.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.config.base import AbsPath, Section

SLURM_STAGES = ("corpus", "tokenizer", "prepare", "cache", "train", "baseline", "export", "eval", "report")
ARRAY_STAGES = ("prepare", "cache")  # stages whose work splits into independent parts
MULTI_NODE_STAGES = ("cache", "train", "baseline")  # stages that launch ranks on several nodes

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")
_MEMORY = re.compile(r"^\d+[KMGT]?$")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # partition, account, qos
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:|&*\[\]()-]+$")  # Slurm's feature expressions
_SBATCH_OPTION = re.compile(r"^--[a-z][a-z0-9-]*(=[A-Za-z0-9_.,:@%/+=-]+)?$")


def slurm_seconds(value: str) -> int:
    """Seconds of a Slurm time: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`."""
    match = _TIME.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a Slurm time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    days, first, second, third = match.groups()
    numbers = [int(p) for p in (first, second, third) if p is not None]
    if days is None:  # M, M:S, H:M:S
        hours, minutes, seconds = [(0, numbers[0], 0), (0, *numbers), tuple(numbers)][len(numbers) - 1]
    else:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (numbers + [0, 0])[:3]
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def _time(value: str | None) -> str | None:
    if value is not None:
        slurm_seconds(value)
    return value


class SlurmStageConfig(Section):
    """Resources of one stage's job (each array task of prepare and cache gets these)."""

    nodes: int = Field(default=1, gt=0, description="Nodes of the job (cache, train, baseline only).")
    gpus_per_node: int = Field(
        default=0, ge=0, description="GPUs per node (--gpus-per-node); 0 on CPU nodes."
    )
    procs_per_node: int | None = Field(
        default=None,
        gt=0,
        description="Ranks per node; default gpus_per_node, or on CPU nodes what the stage needs (tp x pp).",
    )
    cpus_per_task: int | None = Field(default=None, gt=0, description="--cpus-per-task of the node's task.")
    mem: str | None = Field(default=None, description="--mem per node, e.g. 64G (0: all of it).")
    time: str | None = Field(default=None, description="--time of this stage; default slurm.time.")
    array: int = Field(
        default=1, gt=0, description="prepare and cache: independent parts run as a job array of this size."
    )
    stop_after: str | None = Field(
        default=None,
        description="Wall-time budget (Slurm time): ranks checkpoint and the job requeues itself after it, "
        "even if no signal comes.",
    )

    _times = field_validator("time", "stop_after")(_time)

    @field_validator("mem", mode="before")
    @classmethod
    def _memory(cls, value: str | int | None) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `mem: 0` (all of the node's memory) is a number in YAML
        if value is not None and not _MEMORY.match(value):
            raise ValueError(f"{value!r} is not a Slurm memory size (a number with an optional K, M, G or T)")
        return value


class SlurmConfig(Section):
    """The cluster side of a campaign (`distillery submit`): one job per stage, chained by afterok."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = Field(default=None, description="--constraint (node features).")
    exclusive: bool = Field(default=False, description="--exclusive: whole nodes for every job.")
    time: str = Field(default="01:00:00", description="Default --time of a stage's job.")
    gpu: str | None = Field(
        default=None,
        description="The nodes' GPU (H100, H200, A100 40GB, ...): `submit` plans every stage's memory against "
        "it first and refuses a stage that does not fit (docs/plan.md).",
    )
    python: AbsPath | None = Field(
        default=None,
        description="The Python that runs distillery on the nodes (default: the one running `submit`).",
    )
    setup: list[str] = Field(
        default=[],
        description="Shell lines run before each stage (module loads, a venv, a container); verbatim.",
    )
    sbatch: list[str] = Field(default=[], description="Extra #SBATCH options, e.g. --mail-type=END.")
    signal: Literal["USR1", "USR2"] = Field(
        default="USR1", description="Sent to the batch script `grace_seconds` before the time limit."
    )
    grace_seconds: int = Field(default=300, ge=10, description="Time left to checkpoint after the signal.")
    max_requeues: int = Field(default=5, ge=0, description="Requeues of one job after a stop, at most.")
    port: int = Field(default=29400, ge=1024, le=60000, description="Base port of the c10d rendezvous.")
    stages: dict[str, SlurmStageConfig] = Field(default={}, description="Per-stage resources.")

    _time_ok = field_validator("time")(_time)

    @field_validator("partition", "account", "qos")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"{value!r}: only letters, digits and _ . + - are allowed")
        return value

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, value: str | None) -> str | None:
        if value is not None and not _CONSTRAINT.match(value):
            raise ValueError(f"{value!r} is not a Slurm feature expression (no spaces or shell characters)")
        return value

    @field_validator("sbatch")
    @classmethod
    def _sbatch(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _SBATCH_OPTION.match(value):
                raise ValueError(
                    f"{value!r} is not an sbatch option of the form --name or --name=value "
                    "(no spaces, quotes or shell characters)"
                )
        return values

    @field_validator("setup")
    @classmethod
    def _setup(cls, values: list[str]) -> list[str]:
        for value in values:
            if "\n" in value or "\r" in value:
                raise ValueError(f"{value!r}: one shell line per entry (no newlines)")
        return values

    @model_validator(mode="after")
    def _stages(self) -> SlurmConfig:
        for name, stage in self.stages.items():
            if name not in SLURM_STAGES:
                raise ValueError(f"stages.{name}: not a stage; the stages are {', '.join(SLURM_STAGES)}")
            if stage.array > 1 and name not in ARRAY_STAGES:
                raise ValueError(f"stages.{name}.array: only {' and '.join(ARRAY_STAGES)} run as job arrays")
            if stage.nodes > 1 and name not in MULTI_NODE_STAGES:
                raise ValueError(
                    f"stages.{name}.nodes: {name} runs on one node; only {', '.join(MULTI_NODE_STAGES)} "
                    "use several"
                )
            limit = slurm_seconds(stage.time or self.time)
            if limit <= self.grace_seconds:
                raise ValueError(
                    f"stages.{name}.time: {stage.time or self.time} leaves no time before the stop signal "
                    f"(grace_seconds {self.grace_seconds})"
                )
            if stage.stop_after is not None and slurm_seconds(stage.stop_after) >= limit:
                raise ValueError(
                    f"stages.{name}.stop_after: {stage.stop_after} is not below the time limit "
                    f"{stage.time or self.time}"
                )
        return self

    def stage(self, name: str) -> SlurmStageConfig:
        return self.stages.get(name, SlurmStageConfig())

    def time_of(self, name: str) -> str:
        return self.stage(name).time or self.time
