"""The teacher-signal protocol: one call for a step's micro-batches, one for held-out evaluation.

A `TeacherSource` is where the teacher's knowledge comes from during training: the offline cache
(`cached.py`), a live teacher model (`online.py`), or (next) a teacher with another tokenizer whose
signal is aligned to the student's tokens. Each answers the same two calls:

- `signals(micro_batches)`: the `TeacherSignal` of each micro-batch (what the losses read) on the
  ranks that compute the loss, None elsewhere. A `MicroBatch` carries both what a cache needs (the
  sequences' keys) and what a live teacher needs (their tokens).
- `cross_entropy(micro_batches)`: the teacher's summed next-token cross-entropy and token count of each
  micro-batch, for held-out evaluation (DDK's reference perplexities), with the same placement.

`read_ahead(keys)` announces the next step's sequences; a source that can prepare them in the
background (the cache) does so with the one read-ahead mechanism, `ReadAhead`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch

from distill.cache.reader import SequenceKey
from distill.losses.signal import TeacherSignal

if TYPE_CHECKING:
    from parallel.model import ModelArch


@dataclass(frozen=True)
class MicroBatch:
    keys: list[SequenceKey]  # (domain, split, index) of each sequence
    tokens: torch.Tensor  # [b, s + 1] on the student's device


class TeacherSource(Protocol):
    description: str  # one line for the log
    arch: ModelArch | None  # a teacher that runs in the training job (its FLOPs count); None: a cache

    def signals(self, micro_batches: list[MicroBatch]) -> list[TeacherSignal | None]: ...

    def read_ahead(self, keys: list[list[SequenceKey]]) -> None: ...

    def cross_entropy(self, micro_batches: list[MicroBatch]) -> list[tuple[float, int] | None]: ...

    def close(self) -> None: ...


K = TypeVar("K")
V = TypeVar("V")


class ReadAhead(Generic[K, V]):
    """`load(key)` computed one request ahead in a background thread.

    `start(key)` begins loading; `get(key)` returns the started result if it was for the same key,
    else loads `key` now (the announced key was not the one asked for, e.g. the mixture's weights
    changed in between). Exceptions surface in `get`."""

    def __init__(self, load: Callable[[K], V], name: str) -> None:
        self._load = load
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ahead: tuple[K, Future] | None = None

    def start(self, key: K) -> None:
        self._ahead = (key, self._pool.submit(self._load, key))

    def get(self, key: K) -> V:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            return ahead[1].result()
        if ahead is not None:
            ahead[1].cancel()
        return self._load(key)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
