"""Where the training step's teacher signal comes from: the offline cache, or a live teacher.

Either way the result is, for each micro-batch of a step, a `Teacher` (see `distill/losses/teacher.py`)
on the last pipeline stage and `None` elsewhere, because only the last stage computes the loss.

- `CachedTeacher` reads the cache rows of the micro-batch's sequences, prefetched in a background
  thread for the steps ahead, and only on last-stage ranks.
- `OnlineTeacher` is a second megatron-core model in the same job, sharded exactly like the student
  (same tp and pp: each stage holds its slice of both), run forward-only without gradients through the
  pipeline schedule before the student's step. Its final hidden states (not logits) reach the last
  stage; the fused loss applies its output layer chunk by chunk, so the teacher never holds a
  `[tokens, V]` tensor either.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from distill.cache.reader import CachedSignal, SequenceKey
from distill.config import CampaignConfig
from distill.data.prepared import PreparedData
from distill.errors import DataError
from distill.losses.teacher import LiveTeacher, Teacher, from_cache_rows
from distill.models.teacher import load_teacher, open_teacher
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
    """Cache rows for the micro-batches of each step, in order, read ahead in the background."""

    def __init__(
        self, signal: CachedSignal, micro_batch_keys: Iterable[list[SequenceKey]], *, active: bool
    ) -> None:
        self.signal = signal
        self.teacher_vocab = int(signal.manifest["spec"]["teacher_vocab_size"])
        self._rows: Iterator[dict[str, torch.Tensor]] | None = (
            signal.prefetch(micro_batch_keys, depth=4) if active else None
        )

    def for_step(self, micro_batches: list[torch.Tensor]) -> list[Teacher | None]:
        if self._rows is None:
            return [None] * len(micro_batches)
        return [from_cache_rows(next(self._rows), self.teacher_vocab) for _ in micro_batches]


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
