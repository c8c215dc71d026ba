"""A campaign's plan: per stage, memory per GPU against the GPU, disk, time and GPU-hours, Slurm shape.

`plan_campaign` reads only the config and what is already on disk (architectures, an existing prepared
manifest or cache, a previous run's metrics); it starts no process and downloads nothing. Numbers that
are assumptions (no measured MFU, no cache to measure distinct ids from) say so in their note.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from distill.config import CampaignConfig
from distill.gpus import GPU
from distill.plan.arch import PlannedArch, model_arch, student_arch
from distill.plan.measured import Rates, cache_bytes_per_token, prepared_sequences, rates, training_tokens
from distill.plan.memory import (
    Item,
    Layout,
    activations,
    dtype_bytes,
    forward_only,
    loss_buffers,
    megatron_state,
    zero_state,
)
from distill.training.throughput import flops_per_token
from parallel.model import ModelArch

HEADROOM = 0.90  # of a GPU's memory the plan lets a stage use (CUDA context, allocator fragmentation)


@dataclass
class StagePlan:
    stage: str
    ranks: int
    memory: list[Item] = field(default_factory=list)
    disk: list[Item] = field(default_factory=list)
    seconds: float | None = None
    gpu_hours: float | None = None
    time_note: str = ""
    fits: bool | None = None  # None: no GPU to check against
    advice: str = ""
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_total(self) -> int:
        return sum(item.bytes for item in self.memory)

    def largest(self) -> Item:
        return max(self.memory, key=lambda item: item.bytes)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory_total"] = self.memory_total
        return out


@dataclass
class CampaignPlan:
    gpu: GPU | None
    tokens: int
    archs: dict[str, PlannedArch]
    mfu: float
    mfu_source: str
    stages: list[StagePlan]

    def refusals(self) -> list[StagePlan]:
        return [stage for stage in self.stages if stage.fits is False]

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu": asdict(self.gpu) if self.gpu else None,
            "tokens": self.tokens,
            "architectures": {k: {"source": v.source, **v.arch.to_json()} for k, v in self.archs.items()},
            "mfu": self.mfu,
            "mfu_source": self.mfu_source,
            "stages": [stage.to_json() for stage in self.stages],
        }


def _bf16(config: CampaignConfig, gpu: GPU | None, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and gpu is not None)


def _slurm(config: CampaignConfig, stage: str, seconds: float | None, ranks: int) -> dict[str, Any]:
    if config.slurm is None:
        return {}
    from distill.config.slurm import slurm_seconds

    resources = config.slurm.stage(stage)
    limit = slurm_seconds(resources.time or config.slurm.time)
    per_node = (
        config.ranks_per_node(stage) if stage in ("cache", "train", "baseline", "prune", "correct") else 1
    )
    out: dict[str, Any] = {
        "nodes": resources.nodes,
        "ranks_per_node": per_node,
        "array": resources.array,
        "time_limit_s": limit,
    }
    if seconds is not None:
        # `seconds` is the wall time with every rank of every array task working at once
        out["jobs_in_sequence"] = max(1, math.ceil(seconds / limit))
        out["requeues"] = out["jobs_in_sequence"] - 1
    return out


def _time(
    flops: float, devices: int, gpu: GPU | None, rates: Rates, note: str
) -> tuple[float | None, float | None, str]:
    """Wall time (every device working at once) and device-hours of `flops` model FLOPs."""
    mfu, throughput = rates.mfu, rates.tflops
    if gpu is not None:
        seconds = flops / (devices * gpu.bf16_tflops * 1e12 * mfu)
        return (
            seconds,
            seconds * devices / 3600,
            f"{flops:.3g} model FLOPs at {mfu:.1%} MFU of {gpu.name} ({note})",
        )
    if throughput is not None:
        seconds = flops / (devices * throughput[0] * 1e12)
        return seconds, seconds * devices / 3600, f"{flops:.3g} model FLOPs at {throughput[1]} ({note})"
    return None, None, "no GPU named (--gpu, or slurm.gpu) and no earlier run measured: time not planned"


def world(config: CampaignConfig, stage: str) -> int:
    """The ranks a stage runs on: under Slurm its nodes x ranks per node (x array tasks), else the local
    stage's ranks."""
    if config.slurm is None:
        return config.stage_ranks(stage)
    resources = config.slurm.stage(stage)
    return resources.nodes * config.ranks_per_node(stage) * resources.array


def _check(stage: StagePlan, gpu: GPU | None) -> None:
    if gpu is None:
        return
    stage.fits = stage.memory_total <= gpu.memory_bytes * HEADROOM


def plan_campaign(
    config: CampaignConfig, gpu: GPU | None, tokens: int | None = None, measured: Rates | None = None
) -> CampaignPlan:
    """Every stage of `config` that runs ranks, planned for `gpu` (None: disk and time only)."""
    found = measured or rates(config)  # read once: every stage, and every re-plan of the advice, uses it
    archs: dict[str, PlannedArch] = {}
    if config.teacher is not None:
        source = config.correct.source if config.correct is not None else config.teacher.path
        archs["teacher"] = model_arch(source, "teacher.path")  # type: ignore[arg-type]
    if config.student is not None:
        if config.prune is not None and "teacher" in archs:
            from distill.prune.plan import pruned_arch

            target = pruned_arch(config, archs["teacher"].arch)
            archs["student"] = PlannedArch(target, "the teacher pruned to student.arch")
        else:
            archs["student"] = student_arch(config)
    train_tokens = tokens or (training_tokens(config) if config.training is not None else 0)
    stages: list[StagePlan] = []
    if config.correct is not None and config.training is not None:
        stages.append(_correct_stage(config, archs["teacher"], gpu, found))
    if config.teacher is not None and config.cache is not None:
        stages.append(_cache_stage(config, archs["teacher"].arch, gpu, found, train_tokens))
    if config.prune is not None:
        stages.append(_prune_stage(config, archs["teacher"].arch, archs["student"].arch, gpu, found))
    if config.training is not None and config.student is not None:
        stages.append(_train_stage(config, "train", archs, gpu, found, train_tokens))
        if config.baseline is not None:
            stages.append(
                _train_stage(config, "baseline", {"student": archs["student"]}, gpu, found, train_tokens)
            )
    for stage in stages:
        _check(stage, gpu)
        if stage.fits is False:
            stage.advice = _advice(config, stage, gpu, train_tokens, found)
    return CampaignPlan(gpu, train_tokens, archs, found.mfu, found.mfu_source, stages)


def _cache_stage(
    config: CampaignConfig, teacher: ModelArch, gpu: GPU | None, rates: Rates, train_tokens: int
) -> StagePlan:
    assert config.teacher is not None and config.cache is not None
    layout = config.teacher.layout
    bf16 = _bf16(config, gpu, config.teacher.precision)
    lay = Layout(layout.tp, layout.pp)
    plan = StagePlan("cache", world(config, "cache"))
    plan.memory = forward_only(
        teacher, lay, seq_len=config.data.seq_len, micro_batch=config.teacher.micro_batch, bf16=bf16
    )
    sequences, source = prepared_sequences(config, train_tokens)
    positions = sequences * config.data.seq_len  # predicted positions: the cache's records
    per_token, note = cache_bytes_per_token(config, teacher.vocab_size)
    token_bytes = 2 if teacher.vocab_size <= 65536 else 4
    plan.disk = [
        Item("prepared data", sequences * (config.data.seq_len + 1) * token_bytes, source),
        Item("cache", int(positions * per_token), note),
    ]
    flops = positions * flops_per_token(teacher, config.data.seq_len, backward=False)
    plan.seconds, plan.gpu_hours, plan.time_note = _time(flops, plan.ranks, gpu, rates, "forward only")
    plan.slurm = _slurm(config, "cache", plan.seconds, plan.ranks)
    return plan


def _correct_stage(config: CampaignConfig, teacher: PlannedArch, gpu: GPU | None, rates: Rates) -> StagePlan:
    """The teacher's correction: a training run of the teacher at its own layout (`correction.py`)."""
    from distill.training.correction import correction_config

    fixed = correction_config(config)
    plan = _train_stage(fixed, "train", {"student": teacher}, gpu, rates, training_tokens(fixed))
    plan.stage, plan.ranks = "correct", world(config, "correct")
    plan.slurm = _slurm(config, "correct", plan.seconds, plan.ranks)
    return plan


def _prune_stage(
    config: CampaignConfig, teacher: ModelArch, student: ModelArch, gpu: GPU | None, rates: Rates
) -> StagePlan:
    """Importance on the teacher at its layout (forward passes over the calibration set, once more per
    candidate block when layers are dropped), then the cut on one process."""
    assert config.prune is not None and config.teacher is not None
    layout = config.teacher.layout
    bf16 = _bf16(config, gpu, config.teacher.precision)
    plan = StagePlan("prune", world(config, "prune"))
    micro = config.prune.micro_batch or config.teacher.micro_batch
    plan.memory = forward_only(
        teacher, Layout(layout.tp, layout.pp), seq_len=config.data.seq_len, micro_batch=micro, bf16=bf16
    )
    plan.disk = [Item("student init", student.num_parameters() * 4, "the pruned student, float32")]
    drop = teacher.num_layers - student.num_layers
    passes = 1 + ((teacher.num_layers - drop + 2) if drop and config.prune.method != "width" else 0)
    tokens = config.prune.calibration_sequences * config.data.seq_len
    flops = passes * tokens * flops_per_token(teacher, config.data.seq_len, backward=False)
    plan.seconds, plan.gpu_hours, plan.time_note = _time(
        flops, plan.ranks, gpu, rates, f"{passes} pass(es) over the calibration set"
    )
    plan.slurm = _slurm(config, "prune", plan.seconds, plan.ranks)
    return plan


def _train_stage(
    config: CampaignConfig,
    name: str,
    archs: dict[str, PlannedArch],
    gpu: GPU | None,
    rates: Rates,
    tokens: int,
) -> StagePlan:
    assert config.training is not None and config.checkpoint is not None
    student = archs["student"].arch
    training = config.training
    bf16 = _bf16(config, gpu, training.precision)
    ranks = world(config, name)
    plan = StagePlan(name, ranks)
    if config.engine == "deepspeed":
        from distill.engine.zero.config import zero_section

        zero = zero_section(config)
        lay = Layout(1, 1, ranks)
        plan.memory = zero_state(student, ranks, bf16=bf16, zero_stage=zero.zero_stage)
        in_flight = 1
    else:
        tp, pp = config.parallel.tp, config.parallel.pp
        lay = Layout(tp, pp, max(1, ranks // (tp * pp)))
        plan.memory = megatron_state(
            student, lay, bf16=bf16, distributed_optimizer=training.distributed_optimizer
        )
        in_flight = min(pp, max(1, training.global_batch // (training.micro_batch * lay.dp)))
    plan.memory.append(
        activations(
            student,
            lay,
            seq_len=config.data.seq_len,
            micro_batch=training.micro_batch,
            in_flight=in_flight,
            bf16=bf16,
        )
    )
    plan.memory.append(
        loss_buffers(
            student,
            lay,
            chunk_tokens=_chunk(config, student, lay, gpu),
            tokens=training.micro_batch * config.data.seq_len,
        )
    )
    teacher = archs.get("teacher")
    online = (
        name == "train"
        and config.teacher is not None
        and config.teacher.mode == "online"
        and teacher is not None
    )
    flops_per = flops_per_token(student, config.data.seq_len, backward=True)
    if online:
        assert teacher is not None
        teacher_items = forward_only(
            teacher.arch,
            Layout(lay.tp, lay.pp),
            seq_len=config.data.seq_len,
            micro_batch=training.micro_batch,
            bf16=bf16,
        )
        plan.memory.append(
            Item(
                "online teacher",
                sum(i.bytes for i in teacher_items),
                "its weights, a layer's activations, hidden states",
            )
        )
        flops_per += flops_per_token(teacher.arch, config.data.seq_len, backward=False)
    params = student.num_parameters()
    state_per_param = dtype_bytes(bf16) + (4 if bf16 else 0) + 8
    plan.disk = [
        Item(
            "checkpoints",
            config.checkpoint.keep_last * params * state_per_param,
            f"{config.checkpoint.keep_last} kept",
        ),
    ]
    if config.export is not None:
        export_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[config.export.dtype]
        plan.disk.append(Item("export", params * export_bytes, config.export.dtype))
    plan.seconds, plan.gpu_hours, plan.time_note = _time(
        tokens * flops_per,
        ranks,
        gpu,
        rates,
        "training step" + (" + online teacher" if online else ""),
    )
    plan.slurm = _slurm(config, name, plan.seconds, ranks)
    return plan


def _advice(config: CampaignConfig, stage: StagePlan, gpu: GPU | None, tokens: int, measured: Rates) -> str:
    """The smallest change the config can express that makes `stage` fit, or why none does."""
    candidates: list[str] = []
    if stage.stage == "cache":
        assert config.teacher is not None
        layout = config.teacher.layout
        candidates += [f"teacher.micro_batch={m}" for m in _halvings(config.teacher.micro_batch)]
        candidates += [f"teacher.parallel.tp={t}" for t in (2, 4, 8) if t > layout.tp]
        candidates += [f"teacher.parallel.pp={p}" for p in (2, 4, 8) if p > layout.pp]
    else:
        assert config.training is not None
        candidates += [f"training.micro_batch={m}" for m in _halvings(config.training.micro_batch)]
        if config.engine == "megatron":
            if not config.training.distributed_optimizer:
                candidates.append("training.distributed_optimizer=true")
            candidates += [f"parallel.tp={t}" for t in (2, 4, 8) if t > config.parallel.tp]
            candidates += [f"parallel.pp={p}" for p in (2, 4, 8) if p > config.parallel.pp]
        else:
            from distill.engine.zero.config import zero_section

            candidates += [f"deepspeed.zero_stage={z}" for z in (2, 3) if z > zero_section(config).zero_stage]
    for change in candidates:
        key, value = change.split("=")
        try:
            again = plan_campaign(_changed(config, key, value), gpu, tokens, measured)
        except Exception:
            continue
        match = next(s for s in again.stages if s.stage == stage.stage)
        if match.fits:
            return f"fits with {change}"
    return (
        "no single change of micro-batch, tp, pp or optimizer sharding makes it fit: use more GPUs per model"
    )


def _chunk(config: CampaignConfig, arch: ModelArch, layout: Layout, gpu: GPU | None) -> int:
    """Tokens per chunk of the fused loss, as `losses/fused.py` picks them for `loss.chunk_tokens`."""
    from distill.losses.fused import AUTO_CHUNK_BYTES, AUTO_CHUNK_BYTES_CUDA

    if isinstance(config.loss.chunk_tokens, int):
        return config.loss.chunk_tokens
    budget = AUTO_CHUNK_BYTES_CUDA if gpu is not None else AUTO_CHUNK_BYTES
    return max(16, budget // (4 * (arch.vocab_size // layout.tp)))


def _changed(config: CampaignConfig, key: str, value: str) -> CampaignConfig:
    """`config` with one dotted key set (validated again)."""
    import yaml

    tree = config.model_dump(mode="json")
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[leaf] = yaml.safe_load(value)
    return CampaignConfig.model_validate(tree)


def _halvings(value: int) -> list[int]:
    out = []
    while value > 1:
        value //= 2
        out.append(value)
    return out
