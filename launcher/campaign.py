"""A campaign: the stages of one config run in order on this machine, complete ones skipped.

Each stage is idempotent: it checks its output directory's manifest against the config and returns
at once when the output is complete, resumes it when it was interrupted, and refuses (naming the
differing fields) when it holds another config's result. `distillery run` is therefore safe to
re-run after any failure. Later issues append their stages (cache, train, export) to `STAGES`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from distill.atomic import atomic_write_text
from distill.config import CampaignConfig, config_to_yaml
from distill.data.corpus import DemoCorpusSpec, build_demo_corpus
from distill.data.prepare import prepare
from distill.data.tokenizer import ensure_tokenizer


@dataclass(frozen=True)
class Stage:
    name: str
    applies: Callable[[CampaignConfig], bool]
    run: Callable[[CampaignConfig, bool], object]  # (config, progress) -> stage result


def _corpus(config: CampaignConfig, progress: bool) -> object:
    demo = config.data.demo_corpus
    assert demo is not None
    spec = DemoCorpusSpec(demo.domains, demo.max_bytes_per_domain, demo.max_doc_chars)
    return build_demo_corpus(demo.dir, spec, progress=progress)


STAGES: tuple[Stage, ...] = (
    Stage("corpus", lambda c: c.data.demo_corpus is not None, _corpus),
    Stage(
        "tokenizer",
        lambda c: c.data.tokenizer.train is not None,
        lambda c, p: ensure_tokenizer(c.data),
    ),
    Stage("prepare", lambda c: True, lambda c, p: prepare(c, progress=p)),
)


def run_campaign(config: CampaignConfig, *, progress: bool = True) -> None:
    """Run every stage that applies to `config`, in order."""
    config.run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.run.dir / "config.yaml", config_to_yaml(config))
    stages = [s for s in STAGES if s.applies(config)]
    print(
        f"campaign {config.run.name}: {' -> '.join(s.name for s in stages)} in {config.run.dir}",
        file=sys.stderr,
    )
    for stage in stages:
        started = time.monotonic()
        stage.run(config, progress)
        print(
            f"campaign {config.run.name}: {stage.name} done ({time.monotonic() - started:.1f}s)",
            file=sys.stderr,
        )
