"""The plan as a person reads it: per stage, memory per GPU item by item against the GPU, disk, time."""

from __future__ import annotations

from distill.plan.campaign import HEADROOM, CampaignPlan, StagePlan


def gib(value: float) -> str:
    return f"{value / 2**30:,.2f} GiB"


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 60:,.1f} min" if seconds >= 60 else f"{seconds:,.1f} s"


def render(plan: CampaignPlan) -> str:
    gpu = plan.gpu
    lines = [
        f"plan for {gpu.name} ({gpu.memory_gb:g} GB, {gpu.bf16_tflops:g} bf16 TFLOP/s dense)"
        if gpu
        else "plan without a GPU (memory per GPU listed, not checked against one: --gpu NAME)",
        f"training tokens: {plan.tokens:,}; MFU: {plan.mfu:.1%} ({plan.mfu_source})",
    ]
    for name, found in plan.archs.items():
        arch = found.arch
        lines.append(
            f"{name}: {arch.model_type}, {arch.num_parameters() / 1e9:.3g}B parameters, {arch.num_layers} layers, "
            f"hidden {arch.hidden_size}, vocabulary {arch.vocab_size:,} (from {found.source})"
        )
    for stage in plan.stages:
        lines += ["", *_stage(stage, plan)]
    return "\n".join(lines)


def _stage(stage: StagePlan, plan: CampaignPlan) -> list[str]:
    head = f"== {stage.stage} ({stage.ranks} rank(s))"
    if stage.fits is not None:
        budget = plan.gpu.memory_bytes * HEADROOM if plan.gpu else 0
        verdict = "fits" if stage.fits else "DOES NOT FIT"
        head += f": {gib(stage.memory_total)} per GPU of {gib(budget)} usable ({HEADROOM:.0%}): {verdict}"
    lines = [head, "  memory per GPU:"]
    lines += [f"    {item.name:<20} {gib(item.bytes):>14}  {item.note}" for item in stage.memory]
    lines.append(f"    {'total':<20} {gib(stage.memory_total):>14}")
    if stage.fits is False:
        lines.append(f"  largest item: {stage.largest().name}; {stage.advice}")
    if stage.disk:
        lines.append("  disk:")
        lines += [f"    {item.name:<20} {gib(item.bytes):>14}  {item.note}" for item in stage.disk]
    if stage.seconds is not None:
        hours = f"{stage.gpu_hours:,.1f} GPU-hours" if plan.gpu else f"{stage.gpu_hours:,.2f} device-hours"
        lines.append(f"  time: {_hours(stage.seconds)}, {hours} ({stage.time_note})")
    else:
        lines.append(f"  time: {stage.time_note}")
    if stage.slurm:
        slurm = stage.slurm
        shape = f"  slurm: {slurm['nodes']} node(s) x {slurm['ranks_per_node']} rank(s)"
        if slurm["array"] > 1:
            shape += f", array of {slurm['array']}"
        shape += f", --time {slurm['time_limit_s'] / 3600:.1f} h"
        if "jobs_in_sequence" in slurm:
            shape += f": {slurm['jobs_in_sequence']} job(s) in sequence ({slurm['requeues']} requeue(s))"
        lines.append(shape)
    return lines
