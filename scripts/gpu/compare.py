"""How the GPU check judges a run: against the CPU float32 reference, with stated tolerances.

The GPU trains in bf16 (NCCL, `precision: auto`), the reference in float32 on a CPU, so numbers are
compared by relative difference, `|gpu - cpu| / |cpu|`:

- the teacher's held-out bits per byte (the same weights, scored in float32 by the eval stage):
  within `TEACHER_TOLERANCE` (0.1%);
- the distilled and CE-only students' held-out bits per byte (trained in bf16 on a cache written by a
  bf16 teacher), and the last logged training loss of each: within `STUDENT_TOLERANCE` (3%);
- another engine or optimizer on the same device, data, initial weights and steps (ZeRO-2/3, megatron-core's
  DistributedOptimizer) against the demo's megatron-engine run on that device: the loss at a step inside
  the warm-up within `ENGINE_TOLERANCE` (2%); against the CPU reference (when this call has no demo run of
  its own) within `STUDENT_TOLERANCE`.

On the CPU rehearsal the run and its reference are the same computation, so every difference is ~0.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

TEACHER_TOLERANCE = 0.001
STUDENT_TOLERANCE = 0.03
ENGINE_TOLERANCE = 0.02


class StepFailed(Exception):
    """The step ran and its result is wrong (or a command failed): the reason, and what it measured."""

    def __init__(self, reason: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.result = result or {}


class StepSkipped(Exception):
    """The step does not apply here (the reason says why)."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _rel(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-12)


def _curve(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    a, b = _losses(ours), _losses(theirs)
    common = sorted(set(a) & set(b))
    if not common:
        return {"ok": False, "why": "no logged step in common with the reference"}
    last = common[-1]
    return {
        "ok": _rel(a[last], b[last]) <= STUDENT_TOLERANCE,
        "last_step": last,
        "loss": a[last],
        "reference_loss": b[last],
        "rel_diff": _rel(a[last], b[last]),
        "max_rel_diff_over_curve": max(_rel(a[s], b[s]) for s in common),
    }


def _throughput(records: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [r for r in records if "step_seconds" in r]
    facts = records[0] if records else {}
    out: dict[str, Any] = {"device": facts.get("device")}
    if steps:
        out["median_step_seconds"] = statistics.median(r["step_seconds"] for r in steps)
        out["median_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steps)
        peaks = [r.get("memory/cuda_peak_gib") for r in steps if r.get("memory/cuda_peak_gib") is not None]
        if peaks:
            out["cuda_peak_gib"] = max(peaks)
    return out


def stage_seconds(log: str) -> dict[str, float]:
    """`campaign NAME: STAGE done (S s)` lines of a campaign's output."""
    return {m[1]: float(m[2]) for m in re.finditer(r"campaign \S+: (\w+) done \(([\d.]+)s\)", log)}


def compare_demo(run: Path, reference: Path, log: str, *, expect_cuda: bool) -> dict[str, Any]:
    """The demo campaign's run directory against the bundle's CPU reference; raises `StepFailed`."""
    ours_eval = json.loads((run / "eval" / "eval.json").read_text())
    ref_eval = json.loads((reference / "eval.json").read_text())
    heldout: dict[str, Any] = {}
    problems = []
    for model, ref_model in ref_eval["models"].items():
        tolerance = TEACHER_TOLERANCE if model == "teacher" else STUDENT_TOLERANCE
        for domain, ref_domain in ref_model["domains"].items():
            ours = ours_eval["models"][model]["domains"][domain]["bits_per_byte"]
            theirs = ref_domain["bits_per_byte"]
            heldout[f"{model}/{domain}"] = {
                "bpb": ours,
                "reference_bpb": theirs,
                "rel_diff": _rel(ours, theirs),
            }
            if _rel(ours, theirs) > tolerance:
                problems.append(
                    f"{model} {domain}: {ours:.4f} vs {theirs:.4f} bits/byte (tolerance {tolerance:.1%})"
                )
    student = read_metrics(run / "metrics.jsonl")
    baseline = read_metrics(run / "baseline" / "metrics.jsonl")
    curves = {
        "student": _curve(student, read_metrics(reference / "metrics.jsonl")),
        "baseline": _curve(baseline, read_metrics(reference / "baseline_metrics.jsonl")),
    }
    problems += [f"{name} training loss: {c}" for name, c in curves.items() if not c["ok"]]
    device = student[0].get("device") if student else None
    if expect_cuda and (device in (None, "cpu")):
        problems.append(f"the student trained on {device!r}, not on the GPU")
    result = {
        "heldout_bits_per_byte": heldout,
        "training_loss": curves,
        "student_throughput": _throughput(student),
        "baseline_throughput": _throughput(baseline),
        "stage_seconds": stage_seconds(log),
        "tolerances": {"teacher": TEACHER_TOLERANCE, "students": STUDENT_TOLERANCE},
    }
    if problems:
        raise StepFailed("; ".join(problems), result)
    return result


def compare_engine_run(
    metrics: Path, demo_run: Path, reference: Path, at: int, *, expect_cuda: bool
) -> dict[str, Any]:
    """The loss at step `at` of another engine's run against the demo's megatron run on this device
    (`demo_run/metrics.jsonl`), or against the CPU reference when this call has none."""
    ours = _losses(read_metrics(metrics))
    own = demo_run / "metrics.jsonl"
    if own.is_file() and at in _losses(read_metrics(own)):
        theirs, against, tolerance = (
            _losses(read_metrics(own)),
            "the megatron engine on this device",
            ENGINE_TOLERANCE,
        )
    else:
        theirs, against, tolerance = (
            _losses(read_metrics(reference / "metrics.jsonl")),
            "the CPU float32 reference",
            STUDENT_TOLERANCE,
        )
    if at not in ours or at not in theirs:
        return {
            "ok": False,
            "why": f"step {at} is not logged by both runs ({sorted(ours)} vs {sorted(theirs)})",
        }
    records = read_metrics(metrics)
    result = {
        "ok": _rel(ours[at], theirs[at]) <= tolerance,
        "step": at,
        "loss": ours[at],
        "reference_loss": theirs[at],
        "against": against,
        "rel_diff": _rel(ours[at], theirs[at]),
        "tolerance": tolerance,
        **_throughput(records),
    }
    device = records[0].get("device") if records else None
    if expect_cuda and device in (None, "cpu"):
        result.update(ok=False, why=f"trained on {device!r}, not on the GPU")
    return result
