"""`prepare --part I/N`: the reading and tokenizing of `prepare` split over the tasks of a job array, and
the pack step that turns their output into exactly the bytes of a one-part `prepare`.

Why: tokenizing is the expensive part and independent per document, but packing (held-out routing,
sequences, checksums) is sequential: where a document lands depends on all before it. So documents are
split into *units* with independent token streams, N tasks encode disjoint units, and a cheap last step
feeds all units in order through the streaming prepare's `Packer` and `_finish_domain`.

Units (`units`), per domain and source in config order: one per file of a local-file source (sorted, as
`prepare` reads them); a source with `max_documents`, or a `dataset:` source, is one unit read whole
(what it yields depends on what came before). Part I of N encodes the units with index % N == I, with
`prepare`'s readers, record policy and tokenizer worker code.

On disk: `data.dir/.parts/<spec id>/spec.json` (the spec the units belong to) and per unit
`<domain>/unit_<i>/`: `tokens.bin` (token ids with EOS, the stores' dtype), `lengths.bin` (int64 per
document, 0 for one without tokens), `scores.bin` (float64 held-out scores), `unit.json` (counts and the
unit's record tally). A unit is written into a temporary `.unit_<i>.*.tmp` renamed into place: a
restarted part skips finished units and redoes the one it was stopped in (resumable per unit). Parts
may run side by side: they write disjoint units, `spec.json` and the source-hash cache only with the
same bytes by atomic renames, never the stage's progress record. Units of another config (another spec
id) are refused naming the differing fields, or removed with --overwrite; never packed.

Pack (`pack`, run by `prepare(config)` when `data.dir/.parts/` exists): encodes units still missing,
then per domain feeds the units to the packer and merges their tallies into what one reader of the whole
source counts (sums, reasons in first-seen order, the first `EXAMPLES` examples); a file unit's reader
checks `data.max_bad_records` over its file only and `data.max_bad_fraction` not at all: both are
checked over the whole source here. A restarted pack keeps finished domains; `.parts/` is removed
before the manifest is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distill.atomic import atomic_write_json, fsync_dir, read_json
from distill.config.schema import CampaignConfig
from distill.data import encode_worker
from distill.data import prepare as streaming  # what the pack shares with the streaming prepare
from distill.data.packing import DomainState, Packer
from distill.data.prepare import PARTIAL, PARTS, PrepareStage, _say, open_stage
from distill.data.prepare_spec import SOURCE_HASHES
from distill.data.records import EXAMPLES, RecordPolicy, Tally, policy_of
from distill.data.sources import ResolvedSource, open_documents
from distill.data.token_store import TokenStoreWriter, token_dtype
from distill.errors import ConfigError, DataError, OutputExistsError
from distill.stage import Status, differences

ARRAYS = {"tokens": None, "lengths": np.dtype("<i8"), "scores": np.dtype("<f8")}  # None: the token dtype
CHUNK_TOKENS = 1 << 22  # tokens handed to the packer at a time (whole documents)


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
        _say(f"{who}: {stage.out} is complete, nothing to do")
        return {"units": 0, "encoded": 0}
    _other_units(stage, overwrite)
    atomic_write_json(stage.out / SOURCE_HASHES, stage.known)
    root = _units_dir(stage)
    mine = [u for u in units(stage.sources) if u.index % parts == part]
    missing = [u for u in mine if not (root / u.domain / u.name).is_dir()]
    _say(f"{who}: {len(mine) - len(missing)} of {len(mine)} units already encoded, encoding {len(missing)}")
    started = time.monotonic()
    _encode(stage, root, missing, progress, who)
    _say(f"{who}: {len(missing)} units in {time.monotonic() - started:.1f}s into {root}")
    return {"units": len(mine), "encoded": len(missing)}


def pack(stage: PrepareStage, *, overwrite: bool, progress: bool) -> dict[str, Any]:
    """The last step: every unit (encoding missing ones) through the packer into a complete prepare."""
    out = stage.out
    status = stage.output.check(overwrite=overwrite)
    if status is Status.COMPLETE:
        _remove(out / PARTS / spec_id(stage.spec))  # units a straggling part wrote after the pack
        if not any((out / PARTS).iterdir()):
            (out / PARTS).rmdir()
        return streaming.already_complete(out)
    _other_units(stage, overwrite)
    if status is Status.REPLACE:  # another config's output: everything goes but this config's units
        for path in (p for p in out.iterdir() if p.name != PARTS):
            (shutil.rmtree if path.is_dir() else os.unlink)(path)
    if status is not Status.PARTIAL:
        stage.output.begin()
    atomic_write_json(out / SOURCE_HASHES, stage.known)
    started = time.monotonic()
    root = _units_dir(stage)
    todo = [u for u in units(stage.sources) if not (out / u.domain / "domain.json").is_file()]
    missing = [u for u in todo if not (root / u.domain / u.name).is_dir()]
    if missing:
        _say(f"prepare: encoding {len(missing)} units no part encoded")
        _encode(stage, root, missing, progress, "prepare")
    (out / PARTIAL).mkdir(exist_ok=True)
    for name in stage.data.domains:
        if not (out / name / "domain.json").is_file():
            _pack_domain(stage, name, [u for u in todo if u.domain == name], root, progress)
        streaming._report_bad_records(name, read_json(out / name / "domain.json"))
    shutil.rmtree(out / PARTS)
    return streaming.complete(stage, started, progress=progress)


def _other_units(stage: PrepareStage, overwrite: bool) -> None:
    """Refuse units encoded for another config (naming what differs), or with `overwrite` remove them."""
    parts = stage.out / PARTS
    if not parts.is_dir():
        return
    mine = spec_id(stage.spec)
    for other in sorted(p for p in parts.iterdir() if p.name != mine and not p.name.startswith(".")):
        if overwrite:
            _remove(other)
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


def _remove(path: Path) -> None:
    """Delete a directory that others may be looking at: renamed away first (atomic), then removed."""
    trash = path.with_name(f".{path.name}.removed-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # someone else removed it
    shutil.rmtree(trash, ignore_errors=True)


def _units_dir(stage: PrepareStage) -> Path:
    root = stage.out / PARTS / spec_id(stage.spec)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "spec.json", stage.spec)
    return root


def _encode(stage: PrepareStage, root: Path, todo: list[Unit], progress: bool, who: str) -> None:
    """Read and tokenize `todo` in the worker pool (ordered results, a bounded number of batches in
    flight across unit boundaries); each unit is renamed into place when its last batch is written."""
    if not todo:
        return
    data, tokenizer = stage.data, stage.tokenizer
    dtype = token_dtype(tokenizer.vocab_size)
    bar = tqdm(
        desc=who, unit="tok", unit_scale=True, disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    pending: deque = deque()
    batches = _batches(todo, policy_of(data), data.batch_chars)
    writer: _UnitWriter | None = None
    exhausted, failure = False, None
    context = multiprocessing.get_context("spawn")
    with context.Pool(
        data.workers, encode_worker.init_worker, (tokenizer.backend_json, tokenizer.eos_id)
    ) as pool:
        try:
            while True:
                while not exhausted and len(pending) < 2 * data.workers:
                    try:
                        unit, texts, tally = next(batches)
                    except StopIteration:
                        exhausted = True
                        break
                    except DataError as exc:  # a bad record: finish the units read before it, then stop
                        exhausted, failure = True, exc
                        break
                    job = pool.apply_async(encode_worker.encode_batch, (texts,)) if texts else None
                    pending.append((unit, job, tally))
                if not pending:
                    break
                unit, job, tally = pending.popleft()
                writer = writer or _UnitWriter(root / unit.domain, unit, dtype)
                if job is not None:
                    tokens, lengths, scores = job.get()
                    writer.add(tokens, lengths, scores)
                    bar.update(int(lengths.sum()))
                if tally is not None:
                    writer.finish(tally)
                    writer = None
        finally:
            if writer is not None:
                writer.abort()
            bar.close()
    if failure is not None:
        raise failure


def _batches(
    todo: list[Unit], policy: RecordPolicy, chars: int
) -> Iterator[tuple[Unit, list[str], dict[str, Any] | None]]:
    """Each unit's documents in batches of about `chars` characters, then `(unit, [], its tally)`;
    read as `prepare` reads them (the same readers, record policy and max_documents rule)."""
    for unit in todo:
        # one file of a source: the share of bad records is the whole source's (checked by the pack)
        reader = open_documents(
            unit.source, policy if unit.whole else dataclasses.replace(policy, max_bad_fraction=None)
        )
        limit = unit.source.config.max_documents or float("inf")
        batch: list[str] = []
        batch_chars = taken = 0
        documents = iter(reader)
        while taken < limit and (text := next(documents, None)) is not None:
            batch.append(text)
            batch_chars += len(text)
            taken += 1
            if batch_chars >= chars:
                yield unit, batch, None
                batch, batch_chars = [], 0
        if batch:
            yield unit, batch, None
        yield unit, [], reader.tally.state()


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


def _read_unit(path: Path, dtype: np.dtype) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A finished unit's record and arrays (memory-mapped), checked against each other."""
    try:
        meta, arrays = read_json(path / "unit.json"), {}
        for key, kind in ARRAYS.items():
            file, kind = path / f"{key}.bin", kind or np.dtype(dtype)
            arrays[key] = np.memmap(file, kind, "r") if file.stat().st_size else np.empty(0, kind)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); delete it and run `prepare` again") from None
    lengths, tokens = arrays["lengths"], len(arrays["tokens"])
    if not len(lengths) == len(arrays["scores"]) == meta["documents"] or not (
        int(lengths.sum()) == tokens == meta["tokens"]
    ):
        raise DataError(f"{path}: sizes disagree (damaged); delete it and run `prepare` again")
    return meta, arrays


def _pack_domain(stage: PrepareStage, name: str, todo: list[Unit], root: Path, progress: bool) -> None:
    """Feed the domain's units through the streaming prepare's packer and finish it the same way."""
    data, work = stage.data, stage.out / PARTIAL / name
    shutil.rmtree(work, ignore_errors=True)  # an interrupted pack or streaming prepare: packed afresh
    work.mkdir(parents=True)
    dtype = token_dtype(stage.tokenizer.vocab_size)
    train = TokenStoreWriter(work / "train", data.seq_len + 1, dtype)
    heldout = TokenStoreWriter(work / "heldout", data.seq_len + 1, dtype)
    state = DomainState()
    packer = Packer(state, data, train, heldout)
    bar = tqdm(desc=f"pack {name}", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr)
    policy = policy_of(data)
    for key, group in itertools.groupby(todo, key=lambda u: u.source.key):
        tallies, whole = [], False
        for unit in group:
            whole = unit.whole  # a whole source is one unit
            meta, arrays = _read_unit(root / name / unit.name, dtype)
            tallies.append(meta["tally"])
            tokens, lengths, scores = arrays["tokens"], arrays["lengths"], arrays["scores"]
            ends = np.cumsum(lengths)
            start = 0
            while start < len(lengths):
                first = int(ends[start - 1]) if start else 0
                stop = max(start + 1, int(np.searchsorted(ends, first + CHUNK_TOKENS, side="right")))
                packer.add(
                    np.array(tokens[first : ends[stop - 1]], np.uint32),
                    lengths[start:stop],
                    scores[start:stop],
                )
                bar.update(int(ends[stop - 1]) - first)
                start = stop
        tally = tallies[0] if whole else merge_tallies(key, policy, tallies)
        if tally["bad"] or tally["replaced_utf8"]:
            state.sources_done[key] = tally
    bar.close()
    streaming._finish_domain(name, state, data, train, heldout, work, stage.out / name)


def merge_tallies(key: str, policy: RecordPolicy, tallies: list[dict[str, Any]]) -> dict[str, Any]:
    """The tally one reader of a whole source would have kept, from its files' tallies in order; the
    source-wide caps are checked here (`data.max_bad_fraction` with the reader's own message)."""
    merged = Tally(key, policy)
    for t in tallies:
        merged.records += t["records"]
        for reason, count in t["bad"].items():
            merged.bad[reason] = merged.bad.get(reason, 0) + count
        merged.replaced_utf8 += t["replaced_utf8"]
        merged.examples += t["examples"][: EXAMPLES - len(merged.examples)]
    cap = policy.max_bad_records
    if cap is not None and sum(merged.bad.values()) > cap:
        raise DataError(f"{key}: more than data.max_bad_records = {cap} bad records ({merged.summary()})")
    merged.finish()
    return merged.state()
