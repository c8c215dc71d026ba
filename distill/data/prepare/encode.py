"""The encode pipeline of every prepare: documents -> batches -> tokenizer worker processes -> ordered results.

Why one pipeline: the one-pass prepare (`stream.py`) and the array-task parts (`parts.py`) must read and
tokenize documents identically (their outputs are packed into the same bytes), and both need the same
discipline: results in the order the batches were read, at most `in_flight` batches queued in the
worker pool (memory stays bounded however far the readers could run ahead), and a bad record found by
a reader still lets the batches read before it be written (then the error is raised).

Workers are spawned (not forked: the parent may hold threads of the Rust tokenizer) and run
`worker.py`, which imports only numpy and `tokenizers`.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from distill.data.prepare import worker
from distill.data.tokenizer import TokenizerInfo
from distill.errors import DataError

Tag = TypeVar("Tag")  # what the caller attaches to a batch (a reading position, a unit), passed through
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens [sum(lengths)] uint32, lengths [n], scores [n]


@contextmanager
def encode_pool(workers: int, tokenizer: TokenizerInfo) -> Iterator[Any]:
    """A pool of `workers` tokenizer processes, each holding `tokenizer`."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, worker.init_worker, (tokenizer.backend_json, tokenizer.eos_id)) as pool:
        yield pool


def encoded_in_order(
    pool: Any, batches: Iterable[tuple[list[str], Tag]], in_flight: int
) -> Iterator[tuple[Encoded | None, Tag]]:
    """`(encoded batch, tag)` for each `(texts, tag)` of `batches`, in order; an empty batch (a marker
    such as "source finished") comes back as `(None, tag)` without visiting a worker. A `DataError`
    raised while reading is raised after the batches read before it have been yielded."""
    pending: deque = deque()
    reading = iter(batches)
    exhausted, failure = False, None
    while True:
        while not exhausted and len(pending) < in_flight:
            try:
                texts, tag = next(reading)
            except StopIteration:
                exhausted = True
                break
            except DataError as exc:
                exhausted, failure = True, exc
                break
            pending.append((pool.apply_async(worker.encode_batch, (texts,)) if texts else None, tag))
        if not pending:
            break
        job, tag = pending.popleft()
        yield (job.get() if job is not None else None), tag
    if failure is not None:
        raise failure


def document_batches(
    documents: Iterator[str], chars: int, limit: float, taken: int = 0
) -> Iterator[tuple[list[str], int]]:
    """Documents in batches of about `chars` characters (small batches keep the workers evenly loaded),
    each with the count of documents taken so far; stops after `limit` documents (`max_documents`).
    The generator is suspended right after a batch's last document, so a reader's position read then is
    the position after that batch."""
    batch: list[str] = []
    batch_chars = 0
    while taken < limit and (text := next(documents, None)) is not None:
        batch.append(text)
        batch_chars += len(text)
        taken += 1
        if batch_chars >= chars or taken == limit:
            yield batch, taken
            batch, batch_chars = [], 0
    if batch:
        yield batch, taken
