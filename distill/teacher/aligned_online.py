"""A teacher with another tokenizer, live: run forward on the teacher sequences inside the training job.

The teacher is sharded like the student over its own vocabulary (`Engine.frozen_model`); every rank
runs it on the paired teacher sequences of each micro-batch (a collective pass), and the loss ranks get
its final hidden states and output-layer slice: the loss takes the per-shard top m at the aligned
positions chunk by chunk (`losses/uld.py`). The alignment rows are read ahead in a background thread.
For the span term the teacher's log-probs of its own next tokens are computed here, in chunks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.cache.reader import SequenceKey
from distill.config import CampaignConfig
from distill.data.prepared import PreparedData
from distill.engine.base import Engine, ForwardModel
from distill.losses.fused import Terms, chunked_loss, label_logprobs
from distill.losses.signal import AlignedSignal, LiveTop, TeacherSignal
from distill.teacher.aligned import Alignment, Spans
from distill.teacher.source import MicroBatch, ReadAhead

Rows = list[tuple[np.ndarray, Spans | None]]  # per micro-batch
LIVE_CHUNK = 1024  # teacher tokens per chunk of its label log-probs (span term)


class AlignedOnlineSource:
    def __init__(
        self,
        config: CampaignConfig,
        data: PreparedData,
        engine: Engine,
        model: ForwardModel,
        teacher_tokenizer: Any,
    ) -> None:
        self.model, self.data = model, data
        self.align = Alignment(config, data, engine, model.vocab_size, teacher_tokenizer)
        self.arch = model.arch  # its forward pass is part of every step (model FLOPs)
        self.description = self.align.description("online teacher")
        self._ahead: ReadAhead[list[list[SequenceKey]], Rows] | None = (
            ReadAhead(self._read, "aligned-read") if engine.loss_rank else None
        )

    def _read(self, keys: list[list[SequenceKey]]) -> Rows:
        return [self.align.rows(m) for m in keys]

    def signals(self, micro_batches: list[MicroBatch]) -> list[TeacherSignal | None]:
        tokens = [self.align.teacher_tokens(m.keys) for m in micro_batches]  # collective: every rank runs it
        live = self.model.forward(tokens, lambda i, hidden, weight, labels: (hidden, weight))
        if self._ahead is None:
            return [None] * len(micro_batches)
        out: list[TeacherSignal | None] = []
        for m, (index, spans) in enumerate(self._ahead.get([m.keys for m in micro_batches])):
            hidden, weight = live[m]
            hidden = hidden.reshape(-1, hidden.shape[-1])  # [b * T, h_t]
            logprobs = None
            if spans is not None:  # the teacher's log-probs of its own next tokens  [b * T]
                labels = tokens[m][:, 1:].reshape(-1)
                logprobs = label_logprobs(hidden, weight, labels, self.align.teacher_shard, LIVE_CHUNK)
            out.append(
                AlignedSignal(
                    torch.from_numpy(index).to(self.align.device),
                    self.align.vocab,
                    LiveTop(hidden, weight, self.align.teacher_shard),  # weight [V_t/tp, h_t]
                    self.align.match,
                    self.align.span_targets(spans, logprobs),
                    self.align.projection,
                    tokens[m][:, 1:].reshape(-1) if self.align.projection is not None else None,
                )
            )
        return out

    def read_ahead(self, keys: list[list[SequenceKey]]) -> None:
        if self._ahead is not None:
            self._ahead.start(keys)

    def cross_entropy(self, micro_batches: list[MicroBatch]) -> list[tuple[float, int] | None]:
        """Per micro-batch: the teacher's NLL over its real tokens, and the student tokens of that text."""
        tokens = [self.align.teacher_tokens(m.keys) for m in micro_batches]
        lengths = [self.align.lengths(m.keys) for m in micro_batches]
        terms = Terms(weights={"ce": 1.0})

        def score(index: int, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> float:
            real = torch.arange(labels.shape[1], device=labels.device) < torch.from_numpy(
                lengths[index] - 1
            ).to(labels.device).unsqueeze(-1)  # [b, T] positions predicting a real token
            result = chunked_loss(
                hidden[real],
                weight,
                labels[real],
                terms=terms,
                shard=self.align.teacher_shard,
                need_grad=False,
            )
            return float(result.loss_sum)

        nll = self.model.forward(tokens, score)
        counts = [len(m.keys) * self.data.seq_len for m in micro_batches]
        return [None if v is None else (v, n) for v, n in zip(nll, counts, strict=True)]

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
