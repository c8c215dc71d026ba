"""Config sections of what a campaign hands over and compares: held-out evaluation and a CE-only baseline."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from distill.config.base import AbsPath, Section


class EvalConfig(Section):
    """The `eval` stage: held-out cross-entropy, perplexity and bits per UTF-8 byte per domain of the
    teacher, the student and the baseline, on the complete documents of the held-out sequences."""

    dir: AbsPath = Field(description="Where eval.json and the lm-evaluation-harness task files go.")
    sequences: int = Field(
        default=32, gt=0, description="Held-out sequences per domain whose complete documents are scored."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Precision of the forward passes (weights are cast to it)."
    )
    micro_batch: int = Field(default=8, gt=0, description="Windows per forward pass.")
    teacher: bool = Field(default=True, description="Score the teacher too (once per prepared data).")


class BaselineConfig(Section):
    """A student trained on CE only: same architecture, initial weights, data, mixture start, steps and
    batch as the distilled one, so the difference in bits per byte is what distillation bought."""

    dir: AbsPath = Field(description="Its checkpoints, metrics.jsonl and export (`student/`).")
