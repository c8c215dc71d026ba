"""The teacher signal read from the offline cache (`distillery cache`): no teacher model in the job.

Only the ranks that compute the loss read: each step's micro-batches come from the cache rows of their
sequences, and the next step's rows are read in a background thread (`ReadAhead`) while this step
trains (on a GPU into page-locked memory, so their copies to the device do not block); they are used if that step asks for the same sequences, which it does unless the mixture's
weights changed in between. Held-out cross-entropy comes from the log-probs of the actual next tokens
that the cache stored, so DDK's reference needs no teacher pass either.
"""

from __future__ import annotations

import numpy as np
import torch

from distill.cache.reader import CacheReader, SequenceKey
from distill.data.prepared import PreparedData
from distill.losses.signal import TeacherSignal, signal_from_cache_rows
from distill.teacher.source import MicroBatch, ReadAhead

Rows = list[dict[str, torch.Tensor]]


def open_cache(directory: str, data: PreparedData, vocab_size: int) -> CacheReader:
    """The teacher cache, checked against this run. Its shards are checksummed when first read (see
    `CacheReader`), so opening costs the same for a 1 MB and a 40 TB cache."""
    return CacheReader(
        directory, prepared=data, tokenizer_sha256=data.tokenizer_sha256, vocab_size=vocab_size
    )


class CachedSource:
    def __init__(self, reader: CacheReader, *, active: bool, device: torch.device) -> None:
        self.reader, self.device, self.active = reader, device, active
        self.teacher_vocab = int(reader.manifest["spec"]["teacher_vocab_size"])
        self.description = f"cache {reader.directory} ({reader.mode})"
        self.arch = None  # no teacher runs in the training job
        self._rows: ReadAhead[list[list[SequenceKey]], Rows] | None = (
            ReadAhead(self._read, "cache-read") if active else None
        )

    def _read(self, keys: list[list[SequenceKey]]) -> Rows:
        rows = [self.reader.batch(micro) for micro in keys]
        if (
            self.device.type == "cuda"
        ):  # page-locked, in this thread: the copies to the GPU run asynchronously
            rows = [{name: tensor.pin_memory() for name, tensor in row.items()} for row in rows]
        return rows

    def signals(self, micro_batches: list[MicroBatch]) -> list[TeacherSignal | None]:
        if self._rows is None:
            return [None] * len(micro_batches)
        rows = self._rows.get([m.keys for m in micro_batches])
        return [signal_from_cache_rows(r, self.teacher_vocab, self.device) for r in rows]

    def read_ahead(self, keys: list[list[SequenceKey]]) -> None:
        if self._rows is not None:
            self._rows.start(keys)

    def cross_entropy(self, micro_batches: list[MicroBatch]) -> list[tuple[float, int] | None]:
        if not self.active:
            return [None] * len(micro_batches)
        out: list[tuple[float, int] | None] = []
        for micro in micro_batches:
            targets = np.concatenate([self.reader.sequence(key)["target_logprob"] for key in micro.keys])
            out.append((float(-targets.astype(np.float64).sum()), len(targets)))
        return out

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
