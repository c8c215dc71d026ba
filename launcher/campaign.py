"""A campaign: the stages of one config run in order on this machine, complete ones skipped.

Each stage is idempotent: it checks its output directory's manifest against the config and returns
at once when the output is complete, resumes it when it was interrupted, and refuses (naming the
differing fields) when it holds another config's result. `distillery run` is therefore safe to
re-run after any failure. Multi-process stages (train) are started with torchrun on the resolved
config written to `run.dir/config.yaml`. Later issues append their stages (cache, ...) to `STAGES`.
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
from distill.errors import UserError
from distill.stage import StageOutput, Status
from launcher.local import launch_local


@dataclass(frozen=True)
class RunOptions:
    progress: bool = True
    nproc: int | None = None  # ranks for multi-process stages; default tp x pp (one data-parallel replica)


@dataclass(frozen=True)
class Stage:
    name: str
    applies: Callable[[CampaignConfig], bool]
    run: Callable[[CampaignConfig, RunOptions], object]


def _corpus(config: CampaignConfig, options: RunOptions) -> object:
    demo = config.data.demo_corpus
    assert demo is not None
    spec = DemoCorpusSpec(demo.domains, demo.max_bytes_per_domain, demo.max_doc_chars)
    return build_demo_corpus(demo.dir, spec, progress=options.progress)


def _final_step(config: CampaignConfig) -> int | None:
    from distill.checkpoint import latest_checkpoint, read_meta

    assert config.checkpoint is not None
    latest = latest_checkpoint(config.checkpoint.dir)
    return None if latest is None else int(read_meta(latest)["step"])


def _cache(config: CampaignConfig, options: RunOptions) -> object:
    assert config.cache is not None and config.teacher is not None
    nproc = options.nproc or config.teacher.layout.tp * config.teacher.layout.pp
    launch_local(nproc, ["cache", str(config.run.dir / "config.yaml")])
    return None


def _train(config: CampaignConfig, options: RunOptions) -> object:
    assert config.training is not None
    if (_final_step(config) or 0) >= config.training.steps:
        print(
            f"train: {config.checkpoint.dir} holds step {config.training.steps}, nothing to do",
            file=sys.stderr,
        )
        return None
    nproc = options.nproc or config.parallel.tp * config.parallel.pp
    launch_local(nproc, ["train", str(config.run.dir / "config.yaml")])
    return None


def _export(config: CampaignConfig, options: RunOptions) -> object:
    from distill.checkpoint import latest_checkpoint
    from distill.models.convert import EXPORT_RECORD, export_hf

    assert config.export is not None and config.checkpoint is not None
    source = latest_checkpoint(config.checkpoint.dir)
    if source is None:
        raise UserError(f"export: no checkpoint in {config.checkpoint.dir}; run the train stage first")
    record = {"checkpoint": str(source), "dtype": config.export.dtype}
    out = config.export.dir
    output = StageOutput(
        "export",
        out,
        "export.dir",
        record,
        record=EXPORT_RECORD,
        spec_field=None,
        foreign_hint="choose another export.dir",
        replace_stale=True,  # an export of an older checkpoint is replaced by the latest
    )
    if output.check(overwrite=False) is Status.COMPLETE:
        print(f"export: {out} is complete, nothing to do", file=sys.stderr)
        return None
    export_hf(source, out, dtype=config.export.dtype, overwrite=out.exists(), record=record)
    print(f"export: wrote {out} from {source.name}", file=sys.stderr)
    return None


STAGES: tuple[Stage, ...] = (
    Stage("corpus", lambda c: c.data.demo_corpus is not None, _corpus),
    Stage("tokenizer", lambda c: c.data.tokenizer.train is not None, lambda c, o: ensure_tokenizer(c.data)),
    Stage("prepare", lambda c: True, lambda c, o: prepare(c, progress=o.progress)),
    Stage("cache", lambda c: c.cache is not None, _cache),
    Stage("train", lambda c: c.trains, _train),
    Stage("export", lambda c: c.export is not None, _export),
)


def run_campaign(config: CampaignConfig, options: RunOptions = RunOptions()) -> None:
    """Run every stage that applies to `config`, in order."""
    run_stages(config, [s.name for s in STAGES], options)


def run_stages(config: CampaignConfig, names: list[str], options: RunOptions = RunOptions()) -> None:
    """Run the named stages that apply to `config`, in campaign order (complete ones skip themselves)."""
    config.run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.run.dir / "config.yaml", config_to_yaml(config))  # what launched stages read
    stages = [s for s in STAGES if s.name in names and s.applies(config)]
    print(
        f"campaign {config.run.name}: {' -> '.join(s.name for s in stages)} in {config.run.dir}",
        file=sys.stderr,
    )
    for stage in stages:
        started = time.monotonic()
        stage.run(config, options)
        print(
            f"campaign {config.run.name}: {stage.name} done ({time.monotonic() - started:.1f}s)",
            file=sys.stderr,
        )
