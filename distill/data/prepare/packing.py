"""Packing one domain's tokenized documents into fixed-length sequences, and the progress of doing so.

`Packer` routes each document whole to the held-out stream (while it is short of
`data.heldout_sequences`, by the document's stable hash score against `data.heldout_fraction`) or to the
train stream, and cuts each stream into sequences of `seq_len + 1` tokens, carrying the remainder to the
next document. `DomainState` is what a resumed prepare needs of that: counts, carries, the source
position; prepare commits it atomically after the token files are fsynced. `finish_domain` closes a
packed domain: the one-pass prepare and the pack of array-task units end every domain with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill.atomic import atomic_write_json
from distill.config.data import DataConfig
from distill.data.token_store import TokenStoreWriter
from distill.errors import DataError
from distill.messages import say


@dataclass
class DomainState:
    """Progress of one domain, committed atomically after the token files are fsynced."""

    source_index: int = 0
    stream_state: dict | None = None
    docs_in_source: int = 0
    documents: int = 0
    heldout_documents: int = 0
    tokens: int = 0
    train_sequences: int = 0
    heldout_sequences: int = 0
    heldout_dropped_tokens: int = 0
    train_carry: list[int] = field(default_factory=list)
    heldout_carry: list[int] = field(default_factory=list)
    sources_done: dict[str, dict] = field(default_factory=dict)  # finished sources' record tallies


class Packer:
    """Routes tokenized documents to the train / held-out streams and cuts them into sequences."""

    def __init__(
        self, state: DomainState, data: DataConfig, train: TokenStoreWriter, heldout: TokenStoreWriter
    ):
        self.state, self.train, self.heldout = state, train, heldout
        self.seq_tokens = data.seq_len + 1
        self.heldout_target = data.heldout_sequences
        self.fraction = data.heldout_fraction

    def add(self, tokens: np.ndarray, lengths: np.ndarray, scores: np.ndarray) -> None:
        s, t = self.state, self.seq_tokens
        train_pieces = [np.asarray(s.train_carry, dtype=np.uint32)]
        offset = 0
        for length, score in zip(lengths.tolist(), scores.tolist(), strict=True):
            if length == 0:
                continue
            doc = tokens[offset : offset + length]
            offset += length
            s.documents += 1
            s.tokens += length
            if s.heldout_sequences < self.heldout_target and score < self.fraction:
                s.heldout_documents += 1
                buf = np.concatenate([np.asarray(s.heldout_carry, dtype=np.uint32), doc])
                n = min(len(buf) // t, self.heldout_target - s.heldout_sequences)
                self.heldout.append(buf[: n * t].reshape(n, t))
                s.heldout_sequences += n
                rest = buf[n * t :]
                if s.heldout_sequences >= self.heldout_target:
                    s.heldout_dropped_tokens += len(rest)  # held-out is full: the document's tail is dropped
                    rest = rest[:0]
                s.heldout_carry = rest.tolist()
            else:
                train_pieces.append(doc)
        buf = np.concatenate(train_pieces)
        n = len(buf) // t
        self.train.append(buf[: n * t].reshape(n, t))
        s.train_sequences += n
        s.train_carry = buf[n * t :].tolist()


def finish_domain(
    name: str,
    state: DomainState,
    data: DataConfig,
    train: TokenStoreWriter,
    heldout: TokenStoreWriter,
    work: Path,
    final: Path,
) -> None:
    """Check the domain filled what the config asks, close both stores (their checksums go into the
    summary), write `domain.json` and rename the work directory into place: the domain is finished."""
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
        say(
            "prepare",
            f"warning: {keys} has only {state.heldout_sequences} of {data.heldout_sequences} held-out sequences",
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
