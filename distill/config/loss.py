"""The `loss` section: which terms the student trains on, their weights, temperature, TAID schedule."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill.config.base import Section

KD_TERMS = (
    "forward_kl",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "jsd",
    "taid",
    "uld",
    "projected_kl",
    "span",
)
CROSS_TOKENIZER_TERMS = (
    "uld",
    "projected_kl",
    "span",
)  # a teacher with another tokenizer, over a paired prepare


class LossWeightsConfig(Section):
    """Weight of each term in the total loss. `ce` is cross-entropy on the data's next tokens; the rest
    compare the student to the teacher and are multiplied by temperature^2 (see `LossConfig`)."""

    ce: float = Field(default=1.0, ge=0)
    forward_kl: float = Field(
        default=0.0, ge=0, description="KL(p || q); with a cache: top-k + tail bucket or RS-KD."
    )
    reverse_kl: float = Field(default=0.0, ge=0, description="KL(q || p).")
    skew_forward_kl: float = Field(
        default=0.0, ge=0, description="KL(p || a p + (1-a) q), a = loss.skew_alpha."
    )
    skew_reverse_kl: float = Field(
        default=0.0, ge=0, description="KL(q || a q + (1-a) p), a = loss.skew_alpha."
    )
    jsd: float = Field(
        default=0.0, ge=0, description="b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q, b = loss.jsd_beta."
    )
    taid: float = Field(default=0.0, ge=0, description="TAID: CE against softmax((1-tau) z_s + tau z_t).")
    uld: float = Field(
        default=0.0,
        ge=0,
        description="ULD: sorted-probability L1 against a teacher with another tokenizer (paper: 1.5).",
    )
    projected_kl: float = Field(
        default=0.0,
        ge=0,
        description="Forward KL against the teacher's distribution projected onto the student's vocabulary "
        "(each teacher id to the student token of the same bytes, else the longest student token that "
        "prefixes them), at byte-aligned positions.",
    )
    span: float = Field(
        default=0.0,
        ge=0,
        description="Span-likelihood matching (ALM): the likelihood of each byte-aligned span, student vs "
        "a teacher with another tokenizer (binarised KL).",
    )

    def active(self) -> dict[str, float]:
        """The terms with a non-zero weight, in a fixed order."""
        return {name: w for name, w in self.model_dump().items() if w > 0}

    def kd_terms(self) -> dict[str, float]:
        return {name: w for name, w in self.active().items() if name != "ce"}

    @model_validator(mode="after")
    def _something(self) -> LossWeightsConfig:
        if not self.active():
            raise ValueError("every loss weight is 0: nothing to train on")
        return self


class TaidConfig(Section):
    """TAID's adaptive interpolation (Shing et al. 2025; defaults from the reference code)."""

    tau_start: float = Field(default=0.4, ge=0, lt=1, description="0.2 for large teacher/student gaps.")
    tau_end: float = Field(default=1.0, gt=0, le=1)
    alpha: float = Field(default=5e-4, ge=0, le=1, description="Step size of the adaptive increase.")
    beta: float = Field(default=0.99, ge=0, lt=1, description="Momentum of the relative loss improvement.")

    @model_validator(mode="after")
    def _ordered(self) -> TaidConfig:
        if self.tau_start > self.tau_end:
            raise ValueError(f"tau_start {self.tau_start} is above tau_end {self.tau_end}")
        return self


class UldConfig(Section):
    """Universal logit distillation across tokenizers (docs/algorithms.md, "ULD"; docs/cross-tokenizer.md)."""

    alignment: Literal["byte_offset", "positional"] = Field(
        default="byte_offset",
        description="byte_offset: pair the positions where both tokenizations reach the same byte boundary; "
        "positional: the n-th student with the n-th teacher position (the ULD paper).",
    )
    top_m: int = Field(
        default=128,
        gt=0,
        description="Sorted probabilities compared per position (per tp shard, then merged); the rest is "
        "bounded: the reported uld_bound is the most the exact loss can exceed the computed one.",
    )
    hybrid: bool = Field(
        default=False,
        description="Ids whose token text is identical in both vocabularies are compared directly "
        "(forward KL), sorted L1 over the rest.",
    )


class LossConfig(Section):
    """Total loss = w_ce * CE(labels) + T^2 * sum_d w_d * D_d(p_T, q_T).

    p_T, q_T are teacher and student softmaxes at temperature T. The T^2 factor (Hinton et al.) keeps the
    gradient of the divergences on the same scale as at T = 1: the softened softmax shrinks the logit
    gradient by 1/T^2, so without it raising T would silently lower the KD learning rate. CE always uses
    T = 1. A cached top-k teacher was stored at `cache.temperature`, so T must equal it; RS-KD draws
    were taken at T = 1.
    """

    weights: LossWeightsConfig = LossWeightsConfig()
    temperature: float = Field(default=1.0, gt=0)
    skew_alpha: float = Field(default=0.1, gt=0, lt=1, description="a of the skew KLs (DistiLLM uses 0.1).")
    jsd_beta: float = Field(default=0.5, gt=0, lt=1, description="b of the generalized JSD.")
    taid: TaidConfig = TaidConfig()
    uld: UldConfig = UldConfig()
    chunk_tokens: int | Literal["auto"] = Field(
        default="auto",
        description="Tokens per chunk of the fused output-layer loss; auto keeps each chunk's fp32 logits "
        "near 16 MiB per rank on CPU, 256 MiB on a GPU.",
    )
    tf32: bool = Field(
        default=True,
        description="On CUDA the fused loss's fp32 matmuls (logits and their gradients) run on TF32 tensor "
        "cores: 3.6x faster at V = 128k on an H200, gradients within 1e-3 of full fp32 (bench/loss_memory.py); "
        "false: full fp32. No effect on CPU.",
    )

    @model_validator(mode="after")
    def _chunk(self) -> LossConfig:
        if isinstance(self.chunk_tokens, int) and self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive or 'auto', got {self.chunk_tokens}")
        return self
