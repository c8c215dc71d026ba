"""The CE-only baseline of a campaign: what the student would be without its teacher.

Same architecture and initial weights (`student` is shared, so a random student's `init_dir` is the
same directory), same prepared data, steps, batch, schedule, seed and layout; only the objective is
next-token CE and there is no teacher. A DDK mixture needs a teacher to reweigh by, so a DDK run's
baseline draws domains in their natural proportions. Its checkpoints, metrics and export live under
`baseline.dir`, and its resolved config is written there (`config.yaml`) for the launched ranks.
"""

from __future__ import annotations

from distill.config import CampaignConfig
from distill.config.data import MixtureConfig
from distill.config.loss import LossConfig, LossWeightsConfig


def baseline_config(config: CampaignConfig) -> CampaignConfig:
    """`config` turned into its CE-only baseline (requires a `baseline` section)."""
    assert config.baseline is not None and config.checkpoint is not None and config.logging is not None
    root = config.baseline.dir
    mixture = config.data.mixture
    if mixture.type == "ddk":
        mixture = MixtureConfig(type="natural")
    samples = None if config.logging.samples is None else root / "samples.jsonl"
    logging = config.logging.model_copy(update={"metrics": root / "metrics.jsonl", "samples": samples})
    return config.model_copy(
        update={
            "run": config.run.model_copy(update={"name": f"{config.run.name}-baseline", "dir": root}),
            "data": config.data.model_copy(update={"mixture": mixture, "demo_corpus": None}),
            "loss": LossConfig(weights=LossWeightsConfig(ce=1.0), chunk_tokens=config.loss.chunk_tokens),
            "teacher": None,
            "cache": None,
            "checkpoint": config.checkpoint.model_copy(update={"dir": root / "checkpoints"}),
            "logging": logging,
            "export": (
                None if config.export is None else config.export.model_copy(update={"dir": root / "student"})
            ),
            "baseline": None,
            "eval": None,
        }
    )
