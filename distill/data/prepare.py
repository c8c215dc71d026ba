"""`prepare`: stream each domain's documents, tokenize in worker processes, pack, split held-out, write.

Per domain, documents flow in a fixed order (sources in config order, files sorted) through a pool of
tokenizer processes (ordered results, a bounded number of batches in flight) into two packed streams:
`train` and `heldout`. Documents are routed to held-out by a hash of their text (`heldout_fraction`
of them) until `heldout_sequences` are full, so no document is split across the two. Each document
ends with EOS; streams are cut into sequences of `seq_len + 1` tokens; a final partial sequence is
dropped and counted.

Bad records (see `records.py`) stop the stage naming file and line, or with `data.on_bad_record: skip`
are skipped and counted per source and reason in the domain's summary and the manifest.

Resumability: every `checkpoint_seconds` the token files are fsynced and then a small `state.json`
records the readers' positions (file, byte offset, bad-record counts), sequence counts and the unfinished
sequence tails. A restart truncates the files to the recorded counts and continues from there, so an
interrupted-and-resumed prepare writes the same bytes as an uninterrupted one. Finished domains are
moved into place by a directory rename; `manifest.json` is written last.

Scale-out: `prepare --part I/N` (`prepare_parts.py`) splits the reading and tokenizing over the tasks of
a job array; this function, finding their units in `data.dir/.parts/`, is then the pack step, which
feeds them through the same packer and writes the same bytes as a one-part run.

The stage's spec and fingerprint identify content, never paths (`prepare_spec.py`): a prepared
directory, its cache and its sources can all move without orphaning anything.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distill.atomic import atomic_write_json, atomic_write_text, read_json
from distill.config.loader import config_to_yaml
from distill.config.schema import CampaignConfig, DataConfig
from distill.data import encode_worker
from distill.data.packing import DomainState, Packer
from distill.data.pairing import Pairing, pair_domain, resolve_pairing
from distill.data.prepare_spec import (
    SOURCE_HASHES,
    known_hashes,
    prepare_spec,
    prepared_manifest,
)
from distill.data.prepared import read_prepared_manifest
from distill.data.records import RecordPolicy, policy_of
from distill.data.sources import ResolvedSource, open_documents, resolve_source
from distill.data.token_store import TokenStoreWriter, token_dtype
from distill.data.tokenizer import TokenizerInfo, load_tokenizer
from distill.errors import DataError
from distill.stage import StageOutput, Status

PARTIAL = ".partial"
PARTS = ".parts"  # units encoded by `prepare --part I/N` (prepare_parts.py)


@dataclass(frozen=True)
class PrepareStage:
    """What every way of running `prepare` starts from (this module, and the parts and pack of
    `prepare_parts.py`): the config, its tokenizer and sources, the spec and `data.dir`'s contract."""

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


def prepare(config: CampaignConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or skip) the prepare of `config.data`; returns the manifest. When `data.dir`
    holds units encoded by `prepare --part I/N`, this is the pack step (`prepare_parts.pack`)."""
    stage = open_stage(config)
    data, out, output = stage.data, stage.out, stage.output
    if (out / PARTS).is_dir():
        from distill.data.prepare_parts import pack  # prepare_parts builds on this module

        return pack(stage, overwrite=overwrite, progress=progress)
    status = output.check(overwrite=overwrite)
    if status is Status.COMPLETE:
        return already_complete(out)
    if status is Status.REPLACE:
        output.clear()
    if status is not Status.PARTIAL:
        output.begin()
    atomic_write_json(out / SOURCE_HASHES, stage.known)
    partial = out / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    tokenizer = stage.tokenizer
    context = multiprocessing.get_context("spawn")
    with context.Pool(
        data.workers, encode_worker.init_worker, (tokenizer.backend_json, tokenizer.eos_id)
    ) as pool:
        for name in data.domains:
            if not (out / name / "domain.json").is_file():
                _prepare_domain(
                    name, stage.sources[name], data, tokenizer, pool, partial / name, out / name, progress
                )
            _report_bad_records(name, read_json(out / name / "domain.json"))
    return complete(stage, started, progress=progress)


def already_complete(out: Path) -> dict[str, Any]:
    done = read_prepared_manifest(out)
    assert done is not None
    _say(f"prepare: {out} is complete (fingerprint {done['fingerprint'][:12]}), nothing to do")
    return done


def complete(stage: PrepareStage, started: float, *, progress: bool = True) -> dict[str, Any]:
    """After every domain is in place: the manifest (last), `config.yaml`, and the closing line."""
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
    _say(
        f"prepare: {tokens:,} tokens in {elapsed:.1f}s into {out} (fingerprint {manifest['fingerprint'][:12]})",
    )
    return manifest


def _say(message: str) -> None:
    """One status line on stderr (progress bars are optional; these are not)."""
    print(message, file=sys.stderr, flush=True)


def _report_bad_records(domain: str, summary: dict[str, Any]) -> None:
    for key, tally in summary.get("bad_records", {}).items():
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
        _say(f"prepare {domain}: {key}: {skipped}{replaced}{first}".replace(": ; ", ": "))


def _batches(
    sources: list[ResolvedSource], state: DomainState, chars: int, policy: RecordPolicy
) -> Iterator[tuple[list[str], dict]]:
    """Batches of about `chars` characters of documents from the state's position on, each with the
    reading position right after it (small batches keep the workers evenly loaded). Positions are
    snapshots: reading runs ahead of the batches being packed."""
    done = dict(state.sources_done)
    for index in range(state.source_index, len(sources)):
        source = sources[index]
        resume = index == state.source_index
        reader = open_documents(source, policy, state.stream_state if resume else None)
        taken = state.docs_in_source if resume else 0
        limit = source.config.max_documents or float("inf")
        batch: list[str] = []
        batch_chars = 0
        documents = iter(reader)
        while taken < limit and (text := next(documents, None)) is not None:
            batch.append(text)
            batch_chars += len(text)
            taken += 1
            if batch_chars >= chars or taken == limit:
                yield batch, _position(index, reader, taken, done)
                batch, batch_chars = [], 0
        if batch:
            yield batch, _position(index, reader, taken, done)
        tally = reader.tally.state()
        if tally["bad"] or tally["replaced_utf8"]:
            done[source.key] = tally
        yield (
            [],
            {
                "source_index": index + 1,
                "stream_state": None,
                "docs_in_source": 0,
                "sources_done": dict(done),
            },
        )


def _position(source_index: int, reader: Any, docs_in_source: int, done: dict[str, dict]) -> dict[str, Any]:
    return {
        "source_index": source_index,
        "stream_state": reader.state(),
        "docs_in_source": docs_in_source,
        "sources_done": copy.deepcopy(done),
    }


def _prepare_domain(
    name: str,
    sources: list[ResolvedSource],
    data: DataConfig,
    tokenizer: TokenizerInfo,
    pool: Any,
    work: Path,
    final: Path,
    progress: bool,
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    state = DomainState(**read_json(state_path)) if state_path.is_file() else DomainState()
    if state.documents:
        _say(
            f"prepare {name}: resuming after {state.documents:,} documents ({state.train_sequences:,} sequences)",
        )
    dtype = token_dtype(tokenizer.vocab_size)
    seq_tokens = data.seq_len + 1
    train = TokenStoreWriter(work / "train", seq_tokens, dtype, resume_sequences=state.train_sequences)
    heldout = TokenStoreWriter(work / "heldout", seq_tokens, dtype, resume_sequences=state.heldout_sequences)
    packer = Packer(state, data, train, heldout)

    def commit() -> None:
        train.flush()
        heldout.flush()
        atomic_write_json(state_path, asdict(state))

    bar = tqdm(
        desc=f"prepare {name}",
        unit="tok",
        unit_scale=True,
        initial=state.tokens,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    pending: deque = deque()
    batches = _batches(sources, state, data.batch_chars, policy_of(data))
    exhausted, last_commit = False, time.monotonic()
    while True:
        while not exhausted and len(pending) < 2 * data.workers:
            try:
                texts, position = next(batches)
            except StopIteration:
                exhausted = True
                break
            pending.append(
                (pool.apply_async(encode_worker.encode_batch, (texts,)) if texts else None, position)
            )
        if not pending:
            break
        result, position = pending.popleft()
        if result is not None:
            tokens, lengths, scores = result.get()
            packer.add(tokens, lengths, scores)
            bar.update(int(lengths.sum()))
            bar.set_postfix(docs=state.documents, seqs=state.train_sequences, refresh=False)
        state.source_index = position["source_index"]
        state.stream_state = position["stream_state"]
        state.docs_in_source = position["docs_in_source"]
        state.sources_done = position["sources_done"]
        if time.monotonic() - last_commit >= data.checkpoint_seconds:
            commit()
            last_commit = time.monotonic()
    commit()
    bar.close()
    _finish_domain(name, state, data, train, heldout, work, final)


def _finish_domain(
    name: str,
    state: DomainState,
    data: DataConfig,
    train: TokenStoreWriter,
    heldout: TokenStoreWriter,
    work: Path,
    final: Path,
) -> None:
    keys = f"data.domains.{name}"
    if state.documents == 0:
        raise DataError(f"{keys}: the sources yielded no non-empty document")
    if state.train_sequences == 0:
        raise DataError(
            f"{keys}: {state.tokens:,} tokens in {state.documents} documents do not fill one training sequence of "
            f"{data.seq_len + 1} tokens; add data or lower data.seq_len"
        )
    if data.heldout_sequences and state.heldout_sequences == 0:
        raise DataError(
            f"{keys}: no held-out sequence could be filled from {state.documents} documents; raise "
            "data.heldout_fraction or set data.heldout_sequences: 0"
        )
    if state.heldout_sequences < data.heldout_sequences:
        print(
            f"prepare: warning: {keys} has only {state.heldout_sequences} of {data.heldout_sequences} held-out "
            "sequences",
            file=sys.stderr,
        )
    checksums = {"train": train.close(), "heldout": heldout.close()}
    summary = {
        "documents": state.documents,
        "heldout_documents": state.heldout_documents,
        "document_tokens": state.tokens,
        "train_sequences": state.train_sequences,
        "heldout_sequences": state.heldout_sequences,
        "dropped_tokens": len(state.train_carry) + len(state.heldout_carry) + state.heldout_dropped_tokens,
        **{f"{split}_{kind}": value for split, sums in checksums.items() for kind, value in sums.items()},
        "bad_records": state.sources_done,
    }
    atomic_write_json(work / "domain.json", summary)
    (work / "state.json").unlink(missing_ok=True)  # the pack step keeps no state.json
    os.replace(work, final)
