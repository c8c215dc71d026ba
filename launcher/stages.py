"""What each campaign stage does on this machine (the order and the skipping live in `campaign.py`).

Every stage is idempotent under the stage contract (`distill/stage.py`): a complete output is skipped,
an interrupted one resumed, another config's refused. Multi-process stages (cache, train, baseline)
are launched with torch's elastic agent on the resolved config written into their run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.atomic import atomic_write_text, read_json
from distill.config import CampaignConfig, config_to_yaml
from distill.data.corpus.build import DemoCorpusSpec, build_demo_corpus
from distill.errors import UserError
from distill.messages import say
from distill.stage import StageOutput, Status
from launcher.local import launch_local


@dataclass(frozen=True)
class RunOptions:
    progress: bool = True
    nproc: int | None = (
        None  # ranks of the train stages (default run.nproc, else tp x pp); cache: its own tp x pp
    )
    overwrite: bool = False  # the prune stage: replace another config's pruned student


def corpus(config: CampaignConfig, options: RunOptions) -> None:
    demo = config.data.demo_corpus
    assert demo is not None
    spec = DemoCorpusSpec(demo.domains, demo.max_bytes_per_domain, demo.max_doc_chars)
    build_demo_corpus(demo.dir, spec, progress=options.progress)


def cache(config: CampaignConfig, options: RunOptions) -> None:
    assert config.cache is not None and config.teacher is not None
    nproc = options.nproc or config.stage_ranks("cache")
    launch_local(nproc, ["cache", str(config.run.dir / "config.yaml")])


def prune(config: CampaignConfig, options: RunOptions) -> None:
    """The student's initial weights cut from the teacher (`distill/prune/stage.py`): importance on the
    teacher's ranks, then the cut and the step-0 comparison in this process."""
    from distill.prune.stage import PruneStage

    stage = PruneStage(config)
    if stage.importance() is None:
        nproc = options.nproc or config.stage_ranks("prune")
        launch_local(nproc, ["prune", "--measure", str(config.run.dir / "config.yaml")])
    stage.write_student(overwrite=options.overwrite)
    stage.evaluate_step0(progress=options.progress)


def correct(config: CampaignConfig, options: RunOptions) -> None:
    """The teacher fine-tuned on the prepared data (`distill/training/correction.py`), exported to the
    directory `teacher.path` names from then on."""
    from distill.training.correction import correction_config

    _check_correctable(config)
    fixed = correction_config(config)
    fixed.run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(fixed.run.dir / "config.yaml", config_to_yaml(fixed))
    assert config.correct is not None
    say(
        "correct",
        f"{config.correct.steps} CE steps of the teacher {config.correct.source} in {fixed.run.dir}",
    )
    options = RunOptions(options.progress, options.nproc or config.stage_ranks("correct"), options.overwrite)
    train(fixed, options)
    export(fixed, options)


def _check_correctable(config: CampaignConfig) -> None:
    """The correction trains the teacher on the prepared tokens: it must be the data's tokenizer."""
    from distill.data.prepared import PreparedData
    from distill.data.tokenizer import load_tokenizer
    from distill.models.weights import find_weights

    assert config.correct is not None and config.correct.source is not None
    weights = find_weights(config.correct.source)
    found, data = load_tokenizer(weights.tokenizer_dir).sha256, PreparedData(config.data.dir)
    if found != data.tokenizer_sha256:
        raise UserError(
            f"correct: the teacher {config.correct.source} has another tokenizer (sha256 {found[:12]}) than the "
            f"data in {data.directory} ({data.tokenizer_sha256[:12]}); the correction trains it on the prepared "
            "tokens, so it runs only for a teacher of the data's tokenizer (remove `correct`)"
        )


def _final_step(config: CampaignConfig) -> int | None:
    from distill.checkpoint import latest_checkpoint, read_meta

    assert config.checkpoint is not None
    latest = latest_checkpoint(config.checkpoint.dir)
    return None if latest is None else int(read_meta(latest)["step"])


def train(config: CampaignConfig, options: RunOptions) -> None:
    """Train `config`'s student; its resolved config must be at `run.dir/config.yaml`."""
    assert config.training is not None and config.checkpoint is not None
    if (_final_step(config) or 0) >= config.training.steps:
        say("train", f"{config.checkpoint.dir} holds step {config.training.steps}, nothing to do")
        return
    nproc = options.nproc or config.run.nproc or config.parallel.tp * config.parallel.pp
    launch_local(nproc, ["train", str(config.run.dir / "config.yaml")])


def export(config: CampaignConfig, options: RunOptions) -> None:
    from distill.checkpoint import latest_checkpoint
    from distill.engine.megatron.convert import export_hf
    from distill.models.hf_io import EXPORT_RECORD

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
        say("export", f"{out} is complete, nothing to do")
        return
    export_hf(source, out, dtype=config.export.dtype, overwrite=out.exists(), record=record)
    say("export", f"wrote {out} from {source.name}")


def baseline(config: CampaignConfig, options: RunOptions) -> None:
    """The CE-only student of the same size and tokens (`distill/training/baseline.py`), and its export."""
    from distill.training.baseline import baseline_config

    base = baseline_config(config)
    base.run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(base.run.dir / "config.yaml", config_to_yaml(base))
    say("baseline", f"CE only, same student, data and steps, in {base.run.dir}")
    train(base, options)
    if base.export is not None:
        export(base, options)


def _trained_model(config: CampaignConfig) -> Path:
    """What a campaign hands over: its export, else its latest checkpoint."""
    assert config.checkpoint is not None
    return config.export.dir if config.export is not None else config.checkpoint.dir


def evaluate(config: CampaignConfig, options: RunOptions) -> None:
    """Held-out bits per byte of the teacher, the student and the baseline; then the model cards
    of the exports get the numbers."""
    from distill.eval.run import EvalSettings, ModelToEval
    from distill.eval.run import evaluate as run_eval
    from distill.training.baseline import baseline_config

    cfg = config.eval
    assert cfg is not None
    models = []
    if config.teacher is not None and cfg.teacher:
        models.append(ModelToEval("teacher", config.teacher.path, reused=True))
    if config.trains:
        models.append(ModelToEval("student", _trained_model(config)))
    base = baseline_config(config) if config.baseline is not None else None
    if base is not None:
        models.append(ModelToEval("baseline", _trained_model(base)))
    if not models:
        raise UserError("eval: nothing to evaluate (no teacher with eval.teacher, no training sections)")
    settings = EvalSettings(cfg.sequences, cfg.dtype, cfg.micro_batch)
    # a campaign that trains ends with the report stage, which prints the table last
    record = run_eval(
        models, config.data.dir, cfg.dir, settings, progress=options.progress, show_table=not config.trains
    )
    for name, owner in (("student", config), ("baseline", base)):
        if owner is not None and owner.export is not None:
            write_card_with_eval(owner.export.dir, record, name)


def write_card_with_eval(export_dir: Path, evaluation: dict[str, Any], name: str) -> None:
    """Rewrite an export's model card with the eval numbers, where it is model `name` (the card is not
    part of the export's hash)."""
    from distill.checkpoint import resolve_checkpoint
    from distill.models.hf_io import EXPORT_RECORD
    from distill.models.model_card import CARD, model_card_of
    from distill.models.weights import find_weights

    made_from = read_json(export_dir / EXPORT_RECORD)["checkpoint"]
    ckpt = resolve_checkpoint(Path(made_from))
    card = model_card_of(ckpt, find_weights(export_dir).arch, export_dir, evaluation, own=name)
    atomic_write_text(export_dir / CARD, card)


def report(config: CampaignConfig, options: RunOptions) -> None:
    from distill.eval_table import format_table
    from distill.report.build import build_report

    build_report(config.run.dir)
    if config.eval is not None and (config.eval.dir / "eval.json").is_file():
        say("report", format_table(read_json(config.eval.dir / "eval.json")))
