"""Held-out evaluation during training: the student's and the teacher's numbers per domain.

One component answers every held-out question the loop asks: the student's perplexity (what DDK
compares, and what `training.eval_interval` logs), the teacher's on the same sequences (DDK's reference,
and the report's dashed lines at step 0), and the records the metrics get (`eval/<domain>/ce`, `ppl`,
`bpb`; `teacher/...`). Scoring is a CE-only objective on the student's vocabulary shard (it also scores a
live teacher: `OnlineSource.cross_entropy`); the passes go through `heldout_cross_entropy`, which every
rank calls alike and which agrees on stop requests between domains.

Bits per byte of packed sequences: the summed NLL of every predicted token (EOS included) over the
UTF-8 bytes of those tokens; `distillery eval` scores complete documents with rolling windows instead
(docs/evaluation.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from distill.config import CampaignConfig
from distill.config.loss import LossConfig, LossWeightsConfig
from distill.data.prepared import PreparedData
from distill.data.tokenizer import TokenizerInfo
from distill.engine.base import Engine
from distill.eval.text import packed_label_bytes, token_bytes
from distill.messages import say
from distill.metrics import MetricsLogger
from distill.teacher import MicroBatch, TeacherSource
from distill.training.evaluate import Scorer, heldout_cross_entropy
from distill.training.objective import Objective


class HeldoutEval:
    def __init__(
        self,
        config: CampaignConfig,
        data: PreparedData,
        engine: Engine,
        tokenizer: TokenizerInfo,
        check_stop: Callable[[], None],
    ) -> None:
        assert config.training is not None
        self.config, self.data, self.engine, self.tokenizer = config, data, engine, tokenizer
        self.sequences = config.training.eval_sequences
        self.micro_batch = config.training.micro_batch
        self.check_stop = check_stop
        self.objective = Objective(  # CE only, on the student's vocabulary shard
            LossConfig(weights=LossWeightsConfig(ce=1.0), chunk_tokens=config.loss.chunk_tokens),
            shard=engine.shard,
            total_steps=config.training.steps,
        )
        self.teacher: TeacherSource | None = None  # set once the loop has opened its teacher source
        self._label_bytes: dict[str, int] | None = None

    def cross_entropy(self, score: Scorer, sequences: int) -> dict[str, float]:
        """Mean next-token CE per domain of `score` (the student, or a teacher source) on the first
        `sequences` held-out sequences of each domain (collective)."""
        return heldout_cross_entropy(
            score,
            self.data,
            self.engine,
            sequences=sequences,
            micro_batch=self.micro_batch,
            check_stop=self.check_stop,
        )

    def student_scores(self, micro: list[MicroBatch]) -> list[tuple[float, int] | None]:
        return self.objective.cross_entropy(self.engine, micro)

    def student_perplexity(self, sequences: int | None = None) -> dict[str, float]:
        """The student's held-out perplexity per domain (default: DDK's `data.mixture.eval_sequences`)."""
        ce = self.cross_entropy(self.student_scores, sequences or self.config.data.mixture.eval_sequences)
        return {domain: math.exp(value) for domain, value in ce.items()}

    def teacher_perplexity(self) -> dict[str, float]:
        """The teacher's held-out perplexity per domain on DDK's sequences."""
        assert self.teacher is not None
        ce = self.cross_entropy(self.teacher.cross_entropy, self.config.data.mixture.eval_sequences)
        return {domain: math.exp(value) for domain, value in ce.items()}

    def evaluate(self) -> dict[str, float]:
        """The student's held-out perplexity per domain on `training.eval_sequences` sequences each."""
        return self.student_perplexity(self.sequences)

    def record(self, prefix: str, ce: dict[str, float]) -> dict[str, float]:
        """ce, ppl and bits per byte per domain as metrics (`prefix/<domain>/...`)."""
        if self._label_bytes is None:
            table = token_bytes(self.tokenizer)
            self._label_bytes = {
                d: packed_label_bytes(self.data, d, self.sequences, table) for d in self.data.domains
            }
        record = {}
        for domain, value in ce.items():
            tokens = min(self.sequences, self.data.num_sequences(domain, "heldout")) * self.data.seq_len
            record[f"{prefix}/{domain}/ce"] = value
            record[f"{prefix}/{domain}/ppl"] = math.exp(value)
            if self._label_bytes[domain]:
                record[f"{prefix}/{domain}/bpb"] = value * tokens / math.log(2) / self._label_bytes[domain]
        return record

    def teacher_record(self) -> dict[str, float]:
        """The teacher's numbers on the sequences the student is evaluated on (logged at step 0)."""
        assert self.teacher is not None
        return self.record("teacher", self.cross_entropy(self.teacher.cross_entropy, self.sequences))

    def student_record(self) -> dict[str, float]:
        """The student's held-out ce, ppl and bits per byte per domain (`eval/<domain>/...`)."""
        return self.record("eval", self.cross_entropy(self.student_scores, self.sequences))

    def log_student(self, step: int, metrics: MetricsLogger) -> None:
        """Evaluate the student (collective), log the record and one line with each domain's numbers."""
        record = self.student_record()
        if not record:
            return
        metrics.log(step, record)
        shown = ", ".join(
            f"{key.split('/')[1]} {value:.2f} ({record.get(key[:-3] + 'bpb', math.nan):.3f} bits/byte)"
            for key, value in record.items()
            if key.endswith("/ppl")
        )
        say("train", f"held-out perplexity at step {step}: {shown}")
