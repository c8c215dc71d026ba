"""The training objective: the `loss` section made into megatron's loss-function contract.

For each micro-batch the last pipeline stage calls the objective with its final hidden states, the
output-layer weight slice, the labels and the teacher signal; it returns `(loss_sum, num_tokens,
report)` as megatron's `calculate_per_token_loss` expects (gradients are of the token mean over the
global batch). The report carries the weighted total and each term's unweighted sum, so metrics show
every component. After each optimizer step `after_step` advances TAID's tau from the step's mean TAID
loss over all ranks; tau and its schedule state are part of the checkpointed training state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from distill.config.loss import LossConfig
from distill.losses.fused import Terms, fused_output_loss
from distill.losses.signal import TeacherSignal
from distill.losses.taid import TaidSchedule
from distill.losses.terms import extras_of
from parallel.vocab import VocabShard

if TYPE_CHECKING:
    from distill.engine.base import Engine, ForwardModel


class Objective:
    def __init__(self, config: LossConfig, *, shard: VocabShard, total_steps: int) -> None:
        self.shard = shard
        self.terms = Terms(
            weights=config.weights.active(),
            temperature=config.temperature,
            skew_alpha=config.skew_alpha,
            jsd_beta=config.jsd_beta,
            chunk_tokens=None if config.chunk_tokens == "auto" else config.chunk_tokens,
            tf32=config.tf32,
            uld_top_m=config.uld.top_m,
        )
        self.taid = TaidSchedule(config.taid, total_steps) if "taid" in self.terms.weights else None

    @property
    def needs_teacher(self) -> bool:
        return any(name != "ce" for name in self.terms.weights)

    @property
    def report_keys(self) -> list[str]:
        """Keys of the per-micro-batch report, in order (the same on every rank)."""
        extras = extras_of(list(self.terms.weights))  # e.g. ULD's truncation bound and aligned rows
        return ["loss", *self.terms.weights, *extras, "tokens"]

    @property
    def tau(self) -> float:
        return self.taid.tau if self.taid is not None else 0.0

    def __call__(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher: TeacherSignal | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        # hidden [b, s, h], weight [V/tp, h], labels [b, s]
        loss_sum, term_sums = fused_output_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1),
            terms=self.terms,
            shard=self.shard,
            teacher=teacher,
            tau=self.tau,
        )
        tokens = torch.tensor(
            labels.numel(), dtype=torch.int, device=labels.device
        )  # megatron sums it on device
        report = {"loss": loss_sum.detach().double(), **term_sums, "tokens": tokens.clone()}
        return loss_sum, tokens, report

    def cross_entropy(self, model: ForwardModel, micro_batches: list[Any]) -> list[tuple[float, int] | None]:
        """Forward-only pass of `model` over `micro_batches` (each with `.tokens` `[b, s + 1]`) scored
        by this (CE-only) objective: (summed CE, tokens) per micro-batch on the loss ranks."""

        def score(
            index: int, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
        ) -> tuple[float, int]:
            _, _, report = self(hidden, weight, labels, None)
            return float(report["ce"]), int(report["tokens"])

        return model.forward([m.tokens for m in micro_batches], score)

    def after_step(self, means: dict[str, float], step: int) -> None:
        """Advance TAID with the step's global mean TAID loss (identical on every rank)."""
        if self.taid is not None:
            self.taid.update(means["taid"], step)

    def state_dict(self) -> dict[str, Any]:
        return {"taid": self.taid.state_dict()} if self.taid is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.taid is not None and "taid" in state:
            self.taid.load_state_dict(state["taid"])

    def global_means(self, reports: list[dict[str, Any]], engine: Engine) -> tuple[dict[str, float], int]:
        """Global token means of the loss and each term, from a step's per-micro-batch reports: the
        counting ranks' sums, reduced over every rank of `engine`'s job (collective); and the tokens."""
        keys = self.report_keys
        sums = torch.zeros(len(keys), dtype=torch.float64, device=engine.device)  # NCCL: on the device
        if engine.counting_rank:
            for report in reports:
                sums += torch.tensor(
                    [float(report[k]) for k in keys], dtype=torch.float64, device=engine.device
                )
        engine.all_reduce_sum(sums)
        tokens = float(sums[-1])
        return {k: float(v) / tokens for k, v in zip(keys[:-1], sums[:-1], strict=True)}, int(tokens)
