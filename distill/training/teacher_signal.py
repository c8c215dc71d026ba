"""Where the training step's teacher signal comes from: the offline cache, or a live teacher.

Either way the result is, for each micro-batch of a step, a `Teacher` (see `distill/losses/teacher.py`)
on the last pipeline stage and `None` elsewhere, because only the last stage computes the loss.

- `CachedTeacher` reads the cache rows of the micro-batch's sequences, the next step's in a background
  thread, and only on last-stage ranks.
- `OnlineTeacher` is a second megatron-core model in the same job, sharded exactly like the student
  (same tp and pp: each stage holds its slice of both), run forward-only without gradients through the
  pipeline schedule before the student's step. Its final hidden states (not logits) reach the last
  stage; the fused loss applies its output layer chunk by chunk, so the teacher never holds a
  `[tokens, V]` tensor either.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distill.cache.reader import CachedSignal, SequenceKey
from distill.config import CampaignConfig
from distill.data.prepared import PreparedData
from distill.errors import DataError
from distill.losses.teacher import LiveTeacher, Teacher, from_cache_rows
from distill.models.teacher import load_teacher, open_teacher
from distill.training.evaluate import heldout_cross_entropy
from distill.training.objective import Objective
from parallel.distributed import ParallelContext
from parallel.model import ModelArch, emit_hidden_states, output_weight
from parallel.schedule import run_schedule


def open_cache(
    config: CampaignConfig, data: PreparedData, vocab_size: int, ctx: ParallelContext
) -> CachedSignal:
    """The teacher cache, checked against this run and checksummed (each rank a share of the shards)."""
    assert config.cache is not None
    signal = CachedSignal(
        config.cache.dir, prepared=data, tokenizer_sha256=data.tokenizer_sha256, vocab_size=vocab_size
    )
    found: list[list[str]] = [[] for _ in range(ctx.dims.world_size)]
    dist.all_gather_object(found, signal.verify(ctx.rank, ctx.dims.world_size))
    errors = sorted(e for errors in found for e in errors)
    if errors:
        raise DataError(
            f"teacher cache {config.cache.dir} is damaged, refusing to train: " + "; ".join(errors)
        )
    return signal


class CachedTeacher:
    """Cache rows for the micro-batches of each step; the next step's rows are read in a background
    thread while this step trains (used if that step asks for the same sequences, which it does unless
    the mixture's weights changed in between)."""

    def __init__(self, signal: CachedSignal, *, active: bool, device: torch.device) -> None:
        self.signal, self.device = signal, device
        self.teacher_vocab = int(signal.manifest["spec"]["teacher_vocab_size"])
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-read") if active else None
        self._ahead: tuple[list[list[SequenceKey]], Future] | None = None

    def _read(self, keys: list[list[SequenceKey]]) -> list[dict[str, torch.Tensor]]:
        return [self.signal.batch(micro) for micro in keys]

    def for_step(
        self, keys: list[list[SequenceKey]], next_keys: list[list[SequenceKey]] | None
    ) -> list[Teacher | None]:
        """The teacher of each micro-batch (`keys`: its sequences); starts reading `next_keys`."""
        if self._reader is None:
            return [None] * len(keys)
        if self._ahead is not None and self._ahead[0] == keys:
            rows = self._ahead[1].result()
        else:
            rows = self._read(keys)
        self._ahead = (next_keys, self._reader.submit(self._read, next_keys)) if next_keys else None
        return [from_cache_rows(r, self.teacher_vocab, self.device) for r in rows]

    def heldout_cross_entropy(
        self, data: PreparedData, objective: Objective, *, sequences: int, micro_batch: int
    ) -> dict[str, float]:
        """The teacher's mean held-out CE per domain, from the log-probs of the actual next tokens the
        cache stored (no teacher pass; the same on every rank)."""
        del objective, micro_batch
        out = {}
        for domain in data.domains:
            count = min(sequences, data.num_sequences(domain, "heldout"))
            if count:
                targets = [
                    self.signal.sequence((domain, "heldout", i))["target_logprob"] for i in range(count)
                ]
                out[domain] = float(-np.concatenate(targets).astype(np.float64).mean())
        return out


class OnlineTeacher:
    """The live teacher, sharded with the student's layout."""

    def __init__(
        self, config: CampaignConfig, data: PreparedData, ctx: ParallelContext, student: ModelArch
    ) -> None:
        assert config.teacher is not None
        self.ctx, self.seq_len = ctx, data.seq_len
        arch, source, kind = open_teacher(
            config.teacher.path, tokenizer_sha256=data.tokenizer_sha256, data_dir=data.directory
        )
        if arch.vocab_size != student.vocab_size:
            raise DataError(
                f"teacher.path {config.teacher.path}: its vocabulary ({arch.vocab_size}) differs from the "
                f"student's ({student.vocab_size}); an online teacher must split the vocabulary like the student"
            )
        self.arch = arch
        self.model = load_teacher(arch, source, kind, ctx, config.teacher.precision)
        emit_hidden_states(self.model)

    def for_step(self, micro_batches: list[torch.Tensor]) -> list[Teacher | None]:
        """Run the teacher over the step's micro-batches `[mb, seq_len + 1]`; last stage gets its signal."""

        def forward(batch: torch.Tensor, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
            inputs = batch[:, :-1].contiguous()
            positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
            output = model(inputs, positions, attention_mask=None)  # last stage: hidden [mb, s, h_t]
            return output, lambda hidden: (
                hidden.sum() * 0.0,
                torch.tensor(1, dtype=torch.int),
                {"hidden": hidden},
            )

        with torch.no_grad():
            reports = run_schedule(
                self.model,
                micro_batches,
                forward,
                seq_length=self.seq_len,
                micro_batch_size=len(micro_batches[0]),
                forward_only=True,
            )
        if not self.ctx.is_last_stage:
            return [None] * len(micro_batches)
        weight = output_weight(self.model)  # [V/tp, h_t]
        return [LiveTeacher(r["hidden"].reshape(-1, r["hidden"].shape[-1]), weight) for r in reports]

    def heldout_cross_entropy(
        self, data: PreparedData, objective: Objective, *, sequences: int, micro_batch: int
    ) -> dict[str, float]:
        """The teacher's mean held-out CE per domain, one forward pass (collective)."""

        def forward(batch: torch.Tensor, model: torch.nn.Module, ce: Objective) -> tuple[torch.Tensor, Any]:
            inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
            output = model(inputs, positions, attention_mask=None)
            return output, lambda hidden: ce(hidden, output_weight(self.model), labels, None)

        return heldout_cross_entropy(
            self.model, forward, objective, data, self.ctx, sequences=sequences, micro_batch=micro_batch
        )
