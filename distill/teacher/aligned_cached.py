"""A teacher with another tokenizer, from the cache: its top-k over the teacher sequences, aligned.

The cache stage wrote the teacher's top-k (kept log-probs and tail mass) over the paired teacher
sequences (`open_aligned_cache` checks the pairing). Each step's rows (the cache rows, the student ->
teacher positions and spans) are read ahead in a background thread on the loss ranks, like `CachedSource`.
Held-out cross-entropy is the stored log-probs of the teacher's real tokens (`aligned.py` says how it
compares with the student's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.cache.reader import CacheReader, SequenceKey
from distill.config import CampaignConfig
from distill.data.prepared import PreparedData
from distill.engine.base import Engine
from distill.losses.signal import AlignedSignal, CachedTop, TeacherSignal
from distill.teacher.aligned import Alignment, Spans
from distill.teacher.source import MicroBatch, ReadAhead

Rows = list[tuple[np.ndarray, Spans | None, dict[str, torch.Tensor], np.ndarray | None]]  # per micro-batch


class AlignedCachedSource:
    def __init__(
        self,
        config: CampaignConfig,
        data: PreparedData,
        engine: Engine,
        reader: CacheReader,
        teacher_tokenizer: Any,
    ) -> None:
        self.reader = reader
        vocab = int(reader.manifest["spec"]["teacher_vocab_size"])
        self.align = Alignment(config, data, engine, vocab, teacher_tokenizer)
        self.arch = None  # no teacher runs in the training job
        self.active, self.data = engine.loss_rank, data
        self.description = self.align.description(f"cache {reader.directory} (top-k)")
        self._ahead: ReadAhead[list[list[SequenceKey]], Rows] | None = (
            ReadAhead(self._read, "aligned-read") if self.active else None
        )

    def _read(self, keys: list[list[SequenceKey]]) -> Rows:
        return [(*self.align.rows(m), self.reader.batch(m), self.align.teacher_next(m)) for m in keys]

    def signals(self, micro_batches: list[MicroBatch]) -> list[TeacherSignal | None]:
        if self._ahead is None:
            return [None] * len(micro_batches)
        device = self.align.device
        out: list[TeacherSignal | None] = []
        for index, spans, cached, teacher_next in self._ahead.get([m.keys for m in micro_batches]):
            flat = {k: v.reshape(-1, *v.shape[2:]).to(device) for k, v in cached.items()}
            out.append(
                AlignedSignal(
                    torch.from_numpy(index).to(device),
                    self.align.vocab,
                    CachedTop(flat["ids"].long(), flat["logprobs"], flat["tail"]),
                    self.align.match,
                    self.align.span_targets(spans, flat["target_logprob"]),
                    self.align.projection,
                    None if teacher_next is None else torch.from_numpy(teacher_next).to(device),
                )
            )
        return out

    def read_ahead(self, keys: list[list[SequenceKey]]) -> None:
        if self._ahead is not None:
            self._ahead.start(keys)

    def cross_entropy(self, micro_batches: list[MicroBatch]) -> list[tuple[float, int] | None]:
        """Per micro-batch: the teacher's NLL over its real tokens, and the student tokens of that text."""
        if not self.active:
            return [None] * len(micro_batches)
        out: list[tuple[float, int] | None] = []
        for m in micro_batches:
            lengths = self.align.lengths(m.keys)
            nll = sum(
                -float(self.reader.sequence(key)["target_logprob"][: n - 1].astype(np.float64).sum())
                for key, n in zip(m.keys, lengths.tolist(), strict=True)
            )
            out.append((nll, len(m.keys) * self.data.seq_len))
        return out

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
