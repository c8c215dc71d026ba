"""A campaign: the stages of one config run in order on this machine, complete ones skipped.

corpus -> tokenizer -> prepare -> correct -> cache -> prune -> train -> baseline -> export -> eval -> report,
each where the config asks for it (`Stage.applies`); what a stage does is in `stages.py`. Each stage is
idempotent: it checks its output directory's manifest against the config and returns at once when the
output is complete, resumes it when it was interrupted, and refuses (naming the differing fields) when
it holds another config's result. `distillery run` is therefore safe to re-run after any failure.
Multi-process stages read the resolved config written to `run.dir/config.yaml`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from distill.atomic import atomic_write_text
from distill.config import CampaignConfig, config_to_yaml
from distill.data.prepare.run import prepare
from distill.data.tokenizer import ensure_tokenizer
from distill.messages import say
from launcher import stages
from launcher.stages import RunOptions

__all__ = ["STAGES", "RunOptions", "Stage", "run_stages"]


@dataclass(frozen=True)
class Stage:
    name: str
    applies: Callable[[CampaignConfig], bool]
    run: Callable[[CampaignConfig, RunOptions], object]


STAGES: tuple[Stage, ...] = (
    Stage("corpus", lambda c: c.data.demo_corpus is not None, stages.corpus),
    Stage("tokenizer", lambda c: c.data.tokenizer.train is not None, lambda c, o: ensure_tokenizer(c.data)),
    Stage("prepare", lambda c: True, lambda c, o: prepare(c, progress=o.progress)),
    Stage("correct", lambda c: c.correct is not None, stages.correct),
    Stage("cache", lambda c: c.cache is not None, stages.cache),
    Stage("prune", lambda c: c.prune is not None, stages.prune),
    Stage("train", lambda c: c.trains, stages.train),
    Stage("baseline", lambda c: c.baseline is not None, stages.baseline),
    Stage("export", lambda c: c.export is not None, stages.export),
    Stage("eval", lambda c: c.eval is not None, stages.evaluate),
    Stage("report", lambda c: c.trains, stages.report),
)


def run_stages(config: CampaignConfig, names: list[str], options: RunOptions | None = None) -> None:
    """Run the named stages that apply to `config`, in campaign order (complete ones skip themselves)."""
    options = options or RunOptions()
    config.run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.run.dir / "config.yaml", config_to_yaml(config))  # what launched stages read
    chosen = [s for s in STAGES if s.name in names and s.applies(config)]
    say(f"campaign {config.run.name}", f"{' -> '.join(s.name for s in chosen)} in {config.run.dir}")
    for stage in chosen:
        started = time.monotonic()
        stage.run(config, options)
        say(f"campaign {config.run.name}", f"{stage.name} done ({time.monotonic() - started:.1f}s)")
