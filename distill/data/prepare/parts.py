"""`prepare --part I/N`: the reading and tokenizing of `prepare` split over the tasks of a job array.

Why: tokenizing is the expensive part and independent per document, but packing (held-out routing,
sequences, checksums) is sequential: where a document lands depends on all before it. So documents are
split into *units* with independent token streams, N tasks encode disjoint units, and a cheap last step
(`pack.py`) feeds all units in order through the one-pass prepare's `Packer` and `finish_domain`.

Units (`units`), per domain and source in config order: one per file of a local-file source (sorted, as
`prepare` reads them); a source with `max_documents`, or a `dataset:` source, is one unit read whole
(what it yields depends on what came before). Part I of N encodes the units with index % N == I through
the one encode pipeline (`encode.py`: the same readers, record policy and tokenizer workers).

On disk: `data.dir/.parts/<spec id>/spec.json` (the spec the units belong to) and per unit
`<domain>/unit_<i>/`: `tokens.bin` (token ids with EOS, the stores' dtype), `lengths.bin` (int64 per
document, 0 for one without tokens), `scores.bin` (float64 held-out scores), `unit.json` (counts and the
unit's record tally). A unit is written into a temporary `.unit_<i>.*.tmp` renamed into place: a
restarted part skips finished units and redoes the one it was stopped in (resumable per unit). Parts
may run side by side: they write disjoint units, `spec.json` and the source-hash cache only with the
same bytes by atomic renames, never the stage's progress record. Units of another config (another spec
id) are refused naming the differing fields, or removed with --overwrite; never packed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distill.atomic import atomic_write_json, fsync_dir, read_json
from distill.config.schema import CampaignConfig
from distill.data.prepare.encode import document_batches, encode_pool, encoded_in_order
from distill.data.prepare.spec import SOURCE_HASHES
from distill.data.prepare.stage import PARTS, PrepareStage, open_stage
from distill.data.sources.records import RecordPolicy, policy_of
from distill.data.sources.resolve import ResolvedSource, open_documents
from distill.data.token_store import token_dtype
from distill.errors import ConfigError, OutputExistsError
from distill.messages import say
from distill.stage import Status, differences

ARRAYS = {"tokens": None, "lengths": np.dtype("<i8"), "scores": np.dtype("<f8")}  # None: the token dtype


@dataclasses.dataclass(frozen=True)
class Unit:
    index: int  # position in the whole config's list of units
    domain: str
    source: ResolvedSource  # a file unit's source holds only its file
    whole: bool  # the whole source (max_documents, or a dataset: stream), not one of its files

    @property
    def name(self) -> str:
        return f"unit_{self.index}"


def units(sources: dict[str, list[ResolvedSource]]) -> list[Unit]:
    """The units of a config, in the order their documents are packed (a function of config + files)."""
    found: list[Unit] = []
    for domain, domain_sources in sources.items():
        for src in domain_sources:
            if src.files and src.config.max_documents is None:
                for path, name in zip(src.files, src.names, strict=True):
                    one = dataclasses.replace(src, files=(path,), names=(name,))
                    found.append(Unit(len(found), domain, one, whole=False))
            else:
                found.append(Unit(len(found), domain, src, whole=True))
    return found


def spec_id(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare_part(
    config: CampaignConfig, part: int, parts: int, progress: bool = True, *, overwrite: bool = False
) -> dict[str, Any]:
    """Encode this task's units (`i % parts == part`) into `data.dir/.parts/`; returns how many it
    has and encoded now. With `overwrite`, another config's units are removed and another config's
    output is left for the pack step (`prepare --overwrite`) to replace."""
    if not 0 <= part < parts:
        raise ConfigError(f"--part {part}/{parts}: expected I/N with 0 <= I < N")
    stage, who = open_stage(config), f"prepare part {part}/{parts}"
    if stage.output.check(overwrite=overwrite, shared=True) is Status.COMPLETE:
        say(who, f"{stage.out} is complete, nothing to do")
        return {"units": 0, "encoded": 0}
    refuse_other_units(stage, overwrite)
    atomic_write_json(stage.out / SOURCE_HASHES, stage.known)
    root = units_dir(stage)
    mine = [u for u in units(stage.sources) if u.index % parts == part]
    missing = [u for u in mine if not (root / u.domain / u.name).is_dir()]
    say(who, f"{len(mine) - len(missing)} of {len(mine)} units already encoded, encoding {len(missing)}")
    started = time.monotonic()
    encode_units(stage, root, missing, progress, who)
    say(who, f"{len(missing)} units in {time.monotonic() - started:.1f}s into {root}")
    return {"units": len(mine), "encoded": len(missing)}


def refuse_other_units(stage: PrepareStage, overwrite: bool) -> None:
    """Refuse units encoded for another config (naming what differs), or with `overwrite` remove them."""
    parts = stage.out / PARTS
    if not parts.is_dir():
        return
    mine = spec_id(stage.spec)
    for other in sorted(p for p in parts.iterdir() if p.name != mine and not p.name.startswith(".")):
        if overwrite:
            remove_shared(other)
            continue
        found = _json_or_none(other / "spec.json")
        diff = (
            differences(found, stage.spec) if isinstance(found, dict) else [f"{other}/spec.json unreadable"]
        )
        raise OutputExistsError(
            f"{parts} holds units encoded by `prepare --part` for a different config "
            f"({'; '.join(diff[:8])}); pass --overwrite to remove them"
        )


def _json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def remove_shared(path: Path) -> None:
    """Delete a directory that others may be looking at: renamed away first (atomic), then removed."""
    trash = path.with_name(f".{path.name}.removed-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # someone else removed it
    shutil.rmtree(trash, ignore_errors=True)


def units_dir(stage: PrepareStage) -> Path:
    root = stage.out / PARTS / spec_id(stage.spec)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "spec.json", stage.spec)
    return root


def encode_units(stage: PrepareStage, root: Path, todo: list[Unit], progress: bool, who: str) -> None:
    """Read and tokenize `todo` through the encode pipeline (ordered results, a bounded number of batches
    in flight across unit boundaries); each unit is renamed into place when its last batch is written."""
    if not todo:
        return
    data, tokenizer = stage.data, stage.tokenizer
    dtype = token_dtype(tokenizer.vocab_size)
    bar = tqdm(
        desc=who, unit="tok", unit_scale=True, disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    writer: _UnitWriter | None = None
    with encode_pool(data.workers, tokenizer) as pool:
        try:
            batches = _batches(todo, policy_of(data), data.batch_chars)
            for result, (unit, tally) in encoded_in_order(pool, batches, 2 * data.workers):
                writer = writer or _UnitWriter(root / unit.domain, unit, dtype)
                if result is not None:
                    tokens, lengths, scores = result
                    writer.add(tokens, lengths, scores)
                    bar.update(int(lengths.sum()))
                if tally is not None:
                    writer.finish(tally)
                    writer = None
        finally:  # a bad record: the units read before it are finished, the one it is in is not
            if writer is not None:
                writer.abort()
            bar.close()


def _batches(
    todo: list[Unit], policy: RecordPolicy, chars: int
) -> Iterator[tuple[list[str], tuple[Unit, dict[str, Any] | None]]]:
    """Each unit's documents in batches, then `([], (unit, its tally))`; read as the one-pass prepare
    reads them (the same readers, record policy and max_documents rule)."""
    for unit in todo:
        # one file of a source: the share of bad records is the whole source's (checked by the pack)
        reader = open_documents(
            unit.source, policy if unit.whole else dataclasses.replace(policy, max_bad_fraction=None)
        )
        limit = unit.source.config.max_documents or float("inf")
        for batch, _ in document_batches(iter(reader), chars, limit):
            yield batch, (unit, None)
        yield [], (unit, reader.tally.state())


class _UnitWriter:
    """One unit's encoded documents, appended to files in a temporary directory renamed into place."""

    def __init__(self, parent: Path, unit: Unit, dtype: np.dtype) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{unit.name}.*.tmp"):  # this unit's run that was stopped: redone
            shutil.rmtree(stale, ignore_errors=True)
        self.unit, self.parent, self.final = unit, parent, parent / unit.name
        self.dtypes = {k: v or np.dtype(dtype) for k, v in ARRAYS.items()}
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{unit.name}.", suffix=".tmp", dir=parent))
        self.files = {k: open(self.tmp / f"{k}.bin", "wb") for k in ARRAYS}
        self.documents = self.tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, scores: np.ndarray) -> None:
        for key, array in (("tokens", tokens), ("lengths", lengths), ("scores", scores)):
            self.files[key].write(np.ascontiguousarray(array, dtype=self.dtypes[key]).tobytes())
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def finish(self, tally: dict[str, Any]) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        unit, counts = self.unit, {"documents": self.documents, "tokens": self.tokens, "tally": tally}
        names = {"unit": unit.index, "source": unit.source.key, "files": list(unit.source.names)}
        with open(self.tmp / "unit.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(names | counts, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not (self.final / "unit.json").is_file():
                raise
            shutil.rmtree(self.tmp)  # another process (the pack) finished this unit meanwhile: same bytes
        fsync_dir(self.parent)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
