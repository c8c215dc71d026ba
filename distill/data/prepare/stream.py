"""The one-pass `prepare`: stream each domain's documents, tokenize in worker processes, pack, split
held-out, write.

Per domain, documents flow in a fixed order (sources in config order, files sorted) through a pool of
tokenizer processes (ordered results, a bounded number of batches in flight) into two packed streams:
`train` and `heldout`. Documents are routed to held-out by a hash of their text (`heldout_fraction`
of them) until `heldout_sequences` are full, so no document is split across the two. Each document
ends with EOS; streams are cut into sequences of `seq_len + 1` tokens; a final partial sequence is
dropped and counted.

Bad records (see `distill/data/sources/records.py`) stop the stage naming file and line, or with `data.on_bad_record: skip`
are skipped and counted per source and reason in the domain's summary and the manifest.

Resumability: every `checkpoint_seconds` the token files are fsynced and then a small `state.json`
records the readers' positions (file, byte offset, bad-record counts), sequence counts and the unfinished
sequence tails. A restart truncates the files to the recorded counts and continues from there, so an
interrupted-and-resumed prepare writes the same bytes as an uninterrupted one. Finished domains are
moved into place by a directory rename; `manifest.json` is written last.

Scale-out: `prepare --part I/N` (`parts.py`) splits the reading and tokenizing over the tasks of a job
array; their pack step (`pack.py`) feeds the units through the same packer and writes the same bytes as
this one-part run.

The stage's spec and fingerprint identify content, never paths (`spec.py`): a prepared
directory, its cache and its sources can all move without orphaning anything.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distill.atomic import atomic_write_json, read_json
from distill.config.schema import DataConfig
from distill.data.prepare.encode import document_batches, encode_pool, encoded_in_order
from distill.data.prepare.packing import DomainState, Packer, finish_domain
from distill.data.prepare.spec import SOURCE_HASHES
from distill.data.prepare.stage import PARTIAL, PrepareStage, already_complete, complete, report_bad_records
from distill.data.sources.records import RecordPolicy, policy_of
from distill.data.sources.resolve import ResolvedSource, open_documents
from distill.data.token_store import TokenStoreWriter, token_dtype
from distill.data.tokenizer import TokenizerInfo
from distill.messages import say
from distill.stage import Status


def prepare_streaming(stage: PrepareStage, *, overwrite: bool, progress: bool) -> dict[str, Any]:
    """Run (or resume, or skip) the one-pass prepare of `stage`; returns the manifest."""
    data, out, output = stage.data, stage.out, stage.output
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
    with encode_pool(data.workers, stage.tokenizer) as pool:
        for name in data.domains:
            if not (out / name / "domain.json").is_file():
                _prepare_domain(
                    name,
                    stage.sources[name],
                    data,
                    stage.tokenizer,
                    pool,
                    partial / name,
                    out / name,
                    progress,
                )
            report_bad_records(out, name)
    return complete(stage, started, progress=progress)


def _batches(
    sources: list[ResolvedSource], state: DomainState, chars: int, policy: RecordPolicy
) -> Iterator[tuple[list[str], dict]]:
    """The documents from the state's position on in batches (`document_batches`), each with the reading
    position right after it. Positions are snapshots: reading runs ahead of the batches being packed."""
    done = dict(state.sources_done)
    for index in range(state.source_index, len(sources)):
        source = sources[index]
        resume = index == state.source_index
        reader = open_documents(source, policy, state.stream_state if resume else None)
        limit = source.config.max_documents or float("inf")
        already = state.docs_in_source if resume else 0
        for batch, taken in document_batches(iter(reader), chars, limit, already):
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
        say(
            f"prepare {name}",
            f"resuming after {state.documents:,} documents ({state.train_sequences:,} sequences)",
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
    batches = _batches(sources, state, data.batch_chars, policy_of(data))
    last_commit = time.monotonic()
    for result, position in encoded_in_order(pool, batches, 2 * data.workers):
        if result is not None:
            tokens, lengths, scores = result
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
    finish_domain(name, state, data, train, heldout, work, final)
