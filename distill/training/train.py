"""`distillery train`: build the engine, run the distillation loop over it, close."""

from __future__ import annotations

from typing import Any

from distill.cache.reader import read_cache_manifest
from distill.config import CampaignConfig
from distill.engine import build_engine
from distill.errors import DataError
from distill.hub import hub_record
from distill.models.weights import directory_sha256, find_weights
from distill.stop import NEVER, StopRequest
from distill.training.loop import DistillLoop, StepResult


def teacher_facts(config: CampaignConfig) -> dict[str, Any] | None:
    """The teacher as the model card names it: path (a hub id with its commit), mode, parameters, content
    hash (from the cache's manifest when cached; hashed here when online)."""
    teacher = config.teacher
    if teacher is None:
        return None
    weights = find_weights(teacher.path)
    facts: dict[str, Any] = {
        "path": str(teacher.path),
        "mode": teacher.mode,
        "parameters": weights.arch.num_parameters(),
    }
    if (hub := hub_record(teacher.path)) is not None:
        facts["hub"] = hub
    if teacher.mode == "cached" and config.cache is not None:
        spec = read_cache_manifest(config.cache.dir)["spec"]
        facts["sha256"] = spec["teacher_sha256"]
        facts["cache"] = {k: spec[k] for k in ("mode", "k", "temperature", "samples", "seed") if k in spec}
    else:
        facts["sha256"] = directory_sha256(weights.directory)
    return facts


def _loop(config: CampaignConfig, engine: Any, stop: StopRequest = NEVER) -> DistillLoop:
    facts = teacher_facts(config) if engine.is_main else None
    return DistillLoop(config, engine, facts, stop)


def build_loop(config: CampaignConfig, ctx: Any = None) -> DistillLoop:
    """The loop over this config's engine, started (`ctx`: an already built parallel context, for tests
    and benchmarks that call `train_step` themselves)."""
    if not config.trains:
        raise DataError("this config has no training sections (student, training, checkpoint, logging)")
    loop = _loop(config, build_engine(config, ctx))
    loop.start()
    return loop


def train(config: CampaignConfig) -> list[StepResult]:
    """The `train` stage on this process (launched once per rank by torchrun or `distillery launch`).
    A stop request (SIGTERM, SIGUSR1/2, the stop file, the time budget; `distill/stop.py`) ends it with
    a checkpoint and `StopRequested`."""
    if not config.trains:
        raise DataError("this config has no training sections (student, training, checkpoint, logging)")
    stop = StopRequest.from_environment().install()
    engine = build_engine(config)
    try:
        return _loop(config, engine, stop).run()
    finally:
        engine.close()
        stop.uninstall()
