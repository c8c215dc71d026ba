"""Config sections of the Minitron stages: teacher correction (`correct`) and structured pruning (`prune`).

`correct` fine-tunes the teacher itself on the prepared training data (plain CE, the same loop and engine
as a student) before anything reads it; the corrected teacher is then *the* teacher of the campaign: the
loader rewrites `teacher.path` to the correction's export and keeps the original as `correct.source`, so
the cache, the pruning, online distillation, eval and the model card all name the corrected model.

`prune` writes the student's initial weights: the teacher cut down to `student.arch` (the target shape;
whatever that section does not size, such as RoPE and norm epsilon, comes from the teacher), into
`student.init_dir`, where the train stage starts from them. See docs/minitron.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from distill.config.base import AbsPath, ModelPath, Section

CORRECTED_TEACHER = "teacher"  # the corrected teacher's HF directory inside correct.dir
PRUNE_RECORD = "distillery_prune.json"  # inside student.init_dir, written with the pruned weights


class CorrectConfig(Section):
    """A short CE training of the teacher on the prepared training data, before caching and pruning."""

    dir: AbsPath = Field(
        description="The correction's checkpoints, metrics.jsonl and the corrected teacher (`teacher/`)."
    )
    steps: int = Field(gt=0, description="Optimizer steps of the correction.")
    lr: float = Field(gt=0, description="Peak learning rate (a fine-tune: well below a from-scratch run's).")
    min_lr: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    global_batch: int | None = Field(default=None, gt=0, description="Default: training.global_batch.")
    micro_batch: int | None = Field(default=None, gt=0, description="Default: training.micro_batch.")
    source: ModelPath | None = Field(
        default=None,
        description="The teacher before correction. Set by the loader from teacher.path (which then names "
        "the corrected teacher); leave it out.",
    )


class PruneConfig(Section):
    """Structured pruning of the teacher into `student.arch` (Minitron), measured on calibration sequences."""

    method: Literal["width", "depth", "both"] = Field(
        default="width",
        description="width: attention query groups / heads, MLP neurons and embedding channels; depth: whole "
        "layers; both: the layers first chosen, then the width of those kept.",
    )
    calibration_sequences: int = Field(
        default=256,
        gt=0,
        description="Prepared training sequences the importance is measured on (forward only), taken from "
        "every domain in turn.",
    )
    depth_metric: Literal["loss", "block_importance"] = Field(
        default="loss",
        description="loss: drop the contiguous block of layers whose removal raises the calibration loss "
        "least (Minitron); block_importance: drop the layers whose output is most like their input "
        "(1 - cosine, ShortGPT).",
    )
    micro_batch: int | None = Field(
        default=None,
        gt=0,
        description="Sequences per calibration forward pass (default teacher.micro_batch).",
    )
    dir: AbsPath = Field(description="The importance scores, the kept indices and the step-0 evaluation.")


def resolve_correction(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw config tree with a `correct` section turned into its resolved form: `teacher.path` names
    the corrected teacher, `correct.source` the one it was made from (idempotent: a resolved tree has a
    source already). The teacher's tokenizer stays the original's (the one `prepare` checks)."""
    correct, teacher = raw.get("correct"), raw.get("teacher")
    if not isinstance(correct, dict) or not isinstance(teacher, dict) or correct.get("source") is not None:
        return raw
    if "dir" not in correct or "path" not in teacher:
        return raw  # the sections' own validation names the missing key
    source = teacher["path"]
    resolved_teacher = {
        **teacher,
        "path": f"{str(correct['dir']).rstrip('/')}/{CORRECTED_TEACHER}",
        "tokenizer": teacher.get("tokenizer") or source,
    }
    return {**raw, "teacher": resolved_teacher, "correct": {**correct, "source": source}}
