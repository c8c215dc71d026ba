"""The pack step of `prepare --part I/N`: every unit (encoding the ones no part encoded) through the
one-pass prepare's `Packer` and `finish_domain`, into exactly the bytes of a one-part `prepare`.

Run by `prepare(config)` when `data.dir/.parts/` exists. Per domain it feeds the units in order to the
packer and merges their tallies into what one reader of the whole source counts (sums, reasons in
first-seen order, the first `EXAMPLES` examples); a file unit's reader checks `data.max_bad_records` over
its file only and `data.max_bad_fraction` not at all: both are checked over the whole source here. A
restarted pack keeps finished domains; `.parts/` is removed before the manifest is written.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distill.atomic import atomic_write_json, read_json
from distill.data.prepare.packing import DomainState, Packer, finish_domain
from distill.data.prepare.parts import (
    ARRAYS,
    Unit,
    encode_units,
    refuse_other_units,
    remove_shared,
    spec_id,
    units,
    units_dir,
)
from distill.data.prepare.spec import SOURCE_HASHES
from distill.data.prepare.stage import (
    PARTIAL,
    PARTS,
    PrepareStage,
    already_complete,
    complete,
    report_bad_records,
)
from distill.data.sources.records import EXAMPLES, RecordPolicy, Tally, policy_of
from distill.data.token_store import TokenStoreWriter, token_dtype
from distill.errors import DataError
from distill.messages import say
from distill.stage import Status

CHUNK_TOKENS = 1 << 22  # tokens handed to the packer at a time (whole documents)


def pack(stage: PrepareStage, *, overwrite: bool, progress: bool) -> dict[str, Any]:
    """The last step: every unit (encoding missing ones) through the packer into a complete prepare."""
    out = stage.out
    status = stage.output.check(overwrite=overwrite)
    if status is Status.COMPLETE:
        remove_shared(out / PARTS / spec_id(stage.spec))  # units a straggling part wrote after the pack
        if not any((out / PARTS).iterdir()):
            (out / PARTS).rmdir()
        return already_complete(out)
    refuse_other_units(stage, overwrite)
    if status is Status.REPLACE:  # another config's output: everything goes but this config's units
        for path in (p for p in out.iterdir() if p.name != PARTS):
            (shutil.rmtree if path.is_dir() else os.unlink)(path)
    if status is not Status.PARTIAL:
        stage.output.begin()
    atomic_write_json(out / SOURCE_HASHES, stage.known)
    started = time.monotonic()
    root = units_dir(stage)
    todo = [u for u in units(stage.sources) if not (out / u.domain / "domain.json").is_file()]
    missing = [u for u in todo if not (root / u.domain / u.name).is_dir()]
    if missing:
        say("prepare", f"encoding {len(missing)} units no part encoded")
        encode_units(stage, root, missing, progress, "prepare")
    (out / PARTIAL).mkdir(exist_ok=True)
    for name in stage.data.domains:
        if not (out / name / "domain.json").is_file():
            _pack_domain(stage, name, [u for u in todo if u.domain == name], root, progress)
        report_bad_records(out, name)
    shutil.rmtree(out / PARTS)
    return complete(stage, started, progress=progress)


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
    """Feed the domain's units through the one-pass prepare's packer and finish it the same way."""
    data, work = stage.data, stage.out / PARTIAL / name
    shutil.rmtree(work, ignore_errors=True)  # an interrupted pack or one-pass prepare: packed afresh
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
    finish_domain(name, state, data, train, heldout, work, stage.out / name)


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
