"""Teacher correction (Minitron): the teacher fine-tuned briefly on the distillation data before use.

When the teacher's original pretraining data is not available, the distribution it learned differs from
the data it is distilled on; a short CE fine-tune on that data first lowers the distillation loss the
student converges to (the Minitron report). The correction is a training run like any other, so it is
this campaign turned into a CE run whose student starts from the original teacher (`correct.source`), at
the teacher's layout (`teacher.parallel`), with `correct`'s steps and learning rate and training's seed,
batch and precision. Its export (`correct.dir/teacher`) is what `teacher.path` names after the loader has
resolved the `correct` section (`distill/config/prune.py`).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from distill.config import CampaignConfig
from distill.config.data import MixtureConfig
from distill.config.loss import LossConfig, LossWeightsConfig
from distill.config.prune import CORRECTED_TEACHER
from distill.config.train import ExportConfig, ParallelConfig, StudentConfig, TrainingConfig
from distill.errors import UserError


def _source_dtype(config: CampaignConfig) -> str:
    """The corrected teacher is written in the precision the original was stored in (float32 if unknown)."""
    from distill.atomic import read_json
    from distill.hub import local_dir

    assert config.correct is not None and config.correct.source is not None
    try:
        found = read_json(local_dir(config.correct.source) / "config.json")
    except (OSError, ValueError):
        return "float32"
    dtype = str(found.get("dtype") or found.get("torch_dtype") or "float32")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def correction_config(config: CampaignConfig) -> CampaignConfig:
    """`config` turned into the teacher's correction run (requires a `correct` section)."""
    correct, teacher, training = config.correct, config.teacher, config.training
    assert correct is not None and teacher is not None and training is not None
    assert config.checkpoint is not None and config.logging is not None and correct.source is not None
    root = correct.dir
    changes: dict[str, Any] = {
        "steps": correct.steps,
        "lr": correct.lr,
        "min_lr": correct.min_lr,
        "warmup_steps": correct.warmup_steps,
        "global_batch": correct.global_batch or training.global_batch,
        "micro_batch": correct.micro_batch or training.micro_batch,
    }
    try:
        corrected_training = TrainingConfig.model_validate({**training.model_dump(), **changes})
    except ValidationError as exc:
        raise UserError(
            f"correct: {exc.errors()[0]['msg']} (correct.steps, lr, warmup_steps, batch)"
        ) from None
    mixture = config.data.mixture
    if mixture.type == "ddk":  # DDK weighs domains by a teacher; the teacher itself trains on the natural mix
        mixture = MixtureConfig(type="natural")
    layout = teacher.layout if config.engine == "megatron" else ParallelConfig()
    return config.model_copy(
        update={
            "run": config.run.model_copy(
                update={"name": f"{config.run.name}-correct", "dir": root, "nproc": None}
            ),
            "data": config.data.model_copy(update={"mixture": mixture, "demo_corpus": None}),
            "student": StudentConfig(init=correct.source),
            "parallel": ParallelConfig(tp=layout.tp, pp=layout.pp),
            "training": corrected_training,
            "loss": LossConfig(weights=LossWeightsConfig(ce=1.0), chunk_tokens=config.loss.chunk_tokens),
            "teacher": None,
            "cache": None,
            "checkpoint": config.checkpoint.model_copy(update={"dir": root / "checkpoints"}),
            "logging": config.logging.model_copy(update={"metrics": root / "metrics.jsonl", "samples": None}),
            "export": ExportConfig(dir=root / CORRECTED_TEACHER, dtype=_source_dtype(config)),  # type: ignore[arg-type]
            "baseline": None,
            "eval": None,
            "correct": None,
            "prune": None,
        }
    )
