"""What every way of running `prepare` starts and ends with: the stage (config, tokenizer, resolved sources,
spec, `data.dir`'s contract), and completing it (pairing, manifest last, the closing line).

Why apart: the one-pass prepare (`stream.py`), the array-task parts (`parts.py`) and their pack step
(`pack.py`) all open the same stage and finish it the same way, so that a prepare split over N tasks ends
in exactly the bytes and records of a one-part run.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.atomic import atomic_write_text, read_json
from distill.config.loader import config_to_yaml
from distill.config.schema import CampaignConfig, DataConfig
from distill.data.pairing.pairs import Pairing, pair_domain, resolve_pairing
from distill.data.prepare.spec import SOURCE_HASHES, known_hashes, prepare_spec, prepared_manifest
from distill.data.prepared import read_prepared_manifest
from distill.data.sources.resolve import ResolvedSource, resolve_source
from distill.data.tokenizer import TokenizerInfo, load_tokenizer
from distill.messages import say
from distill.stage import StageOutput

PARTIAL = ".partial"  # domains being packed; each is renamed into place when finished
PARTS = ".parts"  # units encoded by `prepare --part I/N` (parts.py)


@dataclass(frozen=True)
class PrepareStage:
    """The config, its tokenizer and sources, the spec and `data.dir`'s contract."""

    config: CampaignConfig
    data: DataConfig
    out: Path  # data.dir
    tokenizer: TokenizerInfo
    sources: dict[str, list[ResolvedSource]]
    known: dict[str, list[Any]]  # the source-hash cache, written to `SOURCE_HASHES`
    spec: dict[str, Any]
    output: StageOutput
    pairing: Pairing | None = None  # a teacher with another tokenizer: sequences also in its tokens


def open_stage(config: CampaignConfig) -> PrepareStage:
    """Load the tokenizer, resolve (and hash) the sources, and describe `data.dir` by the spec."""
    data = config.data
    tokenizer = load_tokenizer(data.tokenizer.path)
    sources = {
        name: [
            resolve_source(src, f"data.domains.{name}.sources[{i}]") for i, src in enumerate(domain.sources)
        ]
        for name, domain in data.domains.items()
    }
    known = known_hashes(data.dir)
    pairing = resolve_pairing(config, tokenizer)
    spec = prepare_spec(data, tokenizer, sources, known)
    if pairing is not None:
        spec["pairing"] = pairing.spec()
    output = StageOutput(
        "prepare",
        data.dir,
        "data.dir",
        spec,
        working_files=(PARTS, SOURCE_HASHES),  # array tasks write these and no progress record
    )
    return PrepareStage(config, data, Path(data.dir), tokenizer, sources, known, spec, output, pairing)


def already_complete(out: Path) -> dict[str, Any]:
    done = read_prepared_manifest(out)
    assert done is not None
    say("prepare", f"{out} is complete (fingerprint {done['fingerprint'][:12]}), nothing to do")
    return done


def complete(stage: PrepareStage, started: float, *, progress: bool = True) -> dict[str, Any]:
    """After every domain is in place: the pairing, the manifest (last), `config.yaml`, the closing line."""
    data, out = stage.data, stage.out
    if stage.pairing is not None:
        for name in data.domains:
            pair_domain(out / name, name, stage.tokenizer, stage.pairing, progress=progress)
    manifest = prepared_manifest(out, stage.spec, stage.tokenizer, stage.pairing)
    atomic_write_text(out / "config.yaml", config_to_yaml(stage.config))
    shutil.rmtree(out / PARTIAL)
    stage.output.finish(manifest)
    tokens = sum(d["train_sequences"] + d["heldout_sequences"] for d in manifest["domains"].values()) * (
        data.seq_len + 1
    )
    elapsed = time.monotonic() - started
    say(
        "prepare",
        f"{tokens:,} tokens in {elapsed:.1f}s into {out} (fingerprint {manifest['fingerprint'][:12]})",
    )
    return manifest


def report_bad_records(out: Path, domain: str) -> None:
    """One line per source of a finished domain that had bad records (skipped, or UTF-8 replaced)."""
    for key, tally in read_json(out / domain / "domain.json").get("bad_records", {}).items():
        counts = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(tally["bad"].items()))
        replaced = (
            f"; {tally['replaced_utf8']:,} with invalid UTF-8 replaced" if tally["replaced_utf8"] else ""
        )
        skipped = (
            f"skipped {sum(tally['bad'].values()):,} of {tally['records']:,} records ({counts})"
            if counts
            else ""
        )
        first = f"; first: {tally['examples'][0]}" if tally["examples"] else ""
        say(f"prepare {domain}", f"{key}: {skipped}{replaced}{first}".replace(": ; ", ": "))
