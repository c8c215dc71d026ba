"""The jobs of a campaign on Slurm: which stage runs where, how many parts, on how many nodes, doing what.

One job per campaign stage that applies (`launcher/campaign.py`), in campaign order, each after the one
before it (`--dependency=afterok`). Two stages split: `prepare` with `slurm.stages.prepare.array` > 1 is
a job array of `prepare --part I/N` tasks (each tokenizes its share of the source files) followed by a
`prepare-pack` job that packs the parts in order; `cache` with an array is a job array of
`cache --part I/N` tasks (each a teacher replica over its share of the sequence shards; the last to
finish writes the manifest, and training reads nothing without it). Stages that run ranks (correct,
cache, prune, train, baseline) start one task per node, each running torch's elastic agent (`distillery launch`)
with a c10d rendezvous on the first node. The rest run in the batch script itself.

Whether a stage is complete is read from its output's record (the same files the stage contract
checks); the job itself still applies the full contract (and skips, resumes or refuses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.atomic import read_json
from distill.config import CampaignConfig
from distill.training.baseline import baseline_config
from distill.training.correction import correction_config
from launcher.campaign import STAGES


@dataclass(frozen=True)
class Job:
    name: str  # unique in the campaign: the stage, or prepare-pack
    stage: str  # the campaign stage it does (part of)
    command: tuple[str, ...]  # `distillery` arguments; PART is replaced by I/N in an array task
    array: int = 1  # > 1: a job array of this many tasks
    nodes: int = 1
    ranks_per_node: int = 0  # > 0: launched on every node with this many ranks; 0: in the batch script
    then: tuple[str, ...] = ()  # `distillery` arguments run in the batch script after the launched ranks

    @property
    def launched(self) -> bool:
        return self.ranks_per_node > 0


def campaign_jobs(config: CampaignConfig, config_path: Path) -> list[Job]:
    """The jobs of `config` (whose resolved copy the jobs read at `config_path`), in order."""
    slurm = config.slurm
    assert slurm is not None
    cfg = str(config_path)
    jobs = []
    for stage in STAGES:
        if not stage.applies(config):
            continue
        resources = slurm.stage(stage.name)
        name = stage.name
        if name == "prepare" and resources.array > 1:
            jobs.append(Job("prepare", name, ("prepare", cfg, "--quiet", "--part", "PART"), resources.array))
            jobs.append(Job("prepare-pack", name, ("prepare", cfg, "--quiet")))
        elif name == "cache":
            command = ("cache", cfg) + (("--part", "PART") if resources.array > 1 else ())
            jobs.append(
                Job(name, name, command, resources.array, resources.nodes, config.ranks_per_node(name))
            )
        elif name == "prune":  # the ranks measure, then the batch script cuts and evaluates
            then = ("run", cfg, "--stages", "prune", "--quiet")
            ranks = config.ranks_per_node(name)
            jobs.append(Job(name, name, ("prune", cfg, "--measure"), 1, resources.nodes, ranks, then))
        elif name == "correct":
            fixed = str(correction_config(config).run.dir / "config.yaml")  # written by `submit`
            then = ("run", cfg, "--stages", "correct", "--quiet")  # the corrected teacher's export
            ranks = config.ranks_per_node(name)
            jobs.append(Job(name, name, ("train", fixed), 1, resources.nodes, ranks, then))
        elif name == "train":
            jobs.append(Job(name, name, ("train", cfg), 1, resources.nodes, config.ranks_per_node(name)))
        elif name == "baseline":
            base = str(baseline_config(config).run.dir / "config.yaml")  # written by `submit`
            then = ("run", cfg, "--stages", "baseline", "--quiet")  # the baseline's export
            ranks = config.ranks_per_node(name)
            jobs.append(Job(name, name, ("train", base), 1, resources.nodes, ranks, then))
        else:
            jobs.append(Job(name, name, ("run", cfg, "--stages", name, "--quiet")))
    return jobs


def stage_complete(config: CampaignConfig, stage: str) -> bool:
    """Whether `stage`'s output record says it is done (cheap: no hashing of inputs)."""
    from distill.checkpoint import latest_checkpoint, read_meta
    from distill.models.hf_io import EXPORT_RECORD

    def trained(cfg: CampaignConfig) -> bool:
        assert cfg.checkpoint is not None and cfg.training is not None
        latest = latest_checkpoint(cfg.checkpoint.dir)
        return latest is not None and int(read_meta(latest)["step"]) >= cfg.training.steps

    def exported(cfg: CampaignConfig) -> bool:
        if cfg.export is None:
            return True
        record = cfg.export.dir / EXPORT_RECORD
        assert cfg.checkpoint is not None
        latest = latest_checkpoint(cfg.checkpoint.dir)
        return record.is_file() and latest is not None and read_json(record)["checkpoint"] == str(latest)

    if stage == "corpus":
        assert config.data.demo_corpus is not None
        return (config.data.demo_corpus.dir / "manifest.json").is_file()
    if stage == "tokenizer":
        return (config.data.tokenizer.path / "tokenizer.json").is_file() and (
            config.data.tokenizer.path / "distillery_tokenizer.json"
        ).is_file()
    if stage == "prepare":
        return (config.data.dir / "manifest.json").is_file()
    if stage == "cache":
        assert config.cache is not None
        return (config.cache.dir / "manifest.json").is_file()
    if stage == "correct":
        fixed = correction_config(config)
        return trained(fixed) and exported(fixed)
    if stage == "prune":
        from distill.config.prune import PRUNE_RECORD

        assert config.student is not None and config.student.init_dir is not None and config.prune is not None
        return (config.student.init_dir / PRUNE_RECORD).is_file() and (
            config.prune.dir / "step0" / "eval.json"
        ).is_file()
    if stage == "train":
        return trained(config)
    if stage == "baseline":
        base = baseline_config(config)
        return trained(base) and exported(base)
    if stage == "export":
        return exported(config)
    if stage == "eval":
        assert config.eval is not None
        return (config.eval.dir / "eval.json").is_file()
    if stage == "report":
        return (config.run.dir / "report" / "report.md").is_file()
    raise ValueError(f"unknown stage {stage}")
