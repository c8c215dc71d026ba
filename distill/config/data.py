"""Config sections of the data stages: demo corpus, tokenizer, sources, domains, prepare."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.config.base import AbsPath, ModelPath, Section
from distill.config.hub_id import HubModel

# The demo corpus's domains (built by distill/data/corpus/build.py); defined here so that the config package
# imports nothing else of `distill`.
DEMO_DOMAINS: tuple[str, ...] = ("code", "legal", "docs", "multilingual")
_DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class DemoCorpusConfig(Section):
    """The `corpus` stage: assemble the demo corpus from text that every Debian machine has."""

    dir: AbsPath
    domains: tuple[str, ...] = DEMO_DOMAINS
    max_bytes_per_domain: int = Field(default=4_000_000, gt=0)
    max_doc_chars: int = Field(default=16_000, ge=256)

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, domains: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [d for d in domains if d not in DEMO_DOMAINS]
        if unknown:
            raise ValueError(f"unknown demo domain(s) {unknown}; valid: {list(DEMO_DOMAINS)}")
        if not domains:
            raise ValueError("at least one domain is required")
        return domains


TokenizerAlgorithm = Literal["byte_level_bpe", "unigram"]


class TokenizerTrainConfig(Section):
    """Train a tokenizer on the campaign's own domains (the `tokenizer` stage).

    Both algorithms encode any text without an unknown token: byte-level BPE because its alphabet is
    the 256 bytes, unigram through SentencePiece-style byte fallback (`<0x00>`..`<0xFF>` tokens).
    """

    algorithm: TokenizerAlgorithm = Field(
        default="byte_level_bpe",
        description="byte_level_bpe: GPT-2-style BPE over bytes; unigram: SentencePiece-style unigram "
        "language model (`▁` marks a space) with byte fallback for characters it has no piece for.",
    )
    vocab_size: int = Field(default=8192, ge=300, le=1 << 20)
    min_frequency: int = Field(
        default=2, ge=1, description="byte_level_bpe: merges seen fewer times are not learned."
    )
    max_bytes_per_domain: int = Field(
        default=2_000_000, gt=0, description="Training text taken from each domain, so domains weigh alike."
    )


class TokenizerConfig(Section):
    path: ModelPath = Field(
        description="A Hugging Face tokenizer directory (AutoTokenizer.from_pretrained), or a hub id "
        "(hf://org/name[@revision]) whose tokenizer files are read."
    )
    train: TokenizerTrainConfig | None = Field(
        default=None,
        description="If set, the tokenizer stage trains one into `path`; otherwise `path` must exist.",
    )

    @model_validator(mode="after")
    def _trains_into_a_directory(self) -> TokenizerConfig:
        if self.train is not None and isinstance(self.path, HubModel):
            raise ValueError(
                f"`train` writes a tokenizer into `path`, which must be a directory, not {self.path}"
            )
        return self


class SourceConfig(Section):
    """One stream of documents, read through HF `datasets` with `streaming=True`.

    Either `files` (local jsonl/json/parquet/txt; globs allowed; the format follows the extension
    unless `format` says otherwise) or `dataset` (anything `datasets.load_dataset` accepts).
    """

    files: list[str] | None = None
    format: Literal["json", "parquet", "text"] | None = None
    dataset: str | None = None
    name: str | None = None
    data_dir: str | None = None
    revision: str | None = None
    split: str = "train"
    text_field: str = "text"
    sample_by: Literal["document", "paragraph", "line"] = Field(
        default="document", description="For text files: what one document is."
    )
    max_documents: int | None = Field(default=None, gt=0)

    @field_validator("files", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("files")
    @classmethod
    def _absolute_globs(cls, files: list[str] | None) -> list[str] | None:
        if files is None:
            return None
        if not files:
            raise ValueError("must name at least one file or glob")
        return [os.path.abspath(os.path.expanduser(f)) for f in files]

    @model_validator(mode="after")
    def _files_xor_dataset(self) -> SourceConfig:
        if (self.files is None) == (self.dataset is None):
            raise ValueError(
                "a source needs exactly one of `files` (local files) or `dataset` (load_dataset path)"
            )
        if self.dataset is not None and self.format is not None:
            raise ValueError("`format` applies to `files` sources only")
        return self


class DomainConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)


class MixtureConfig(Section):
    """How training batches draw from the domains (see distill/data/mixture.py).

    natural: in proportion to each domain's training sequences; uniform: equal shares; static: the given
    `weights`; ddk: domain-discrepancy weights (Liu et al. 2024) from the student/teacher held-out
    perplexity ratio, updated every `interval` steps with factor-smooth `alpha`.

    DDK's guardrails: every weight stays within [`min_weight`, `max_weight`] (a number for every domain,
    or one per domain; by default half and twice the uniform share), and each update moves only
    `1 - smoothing` of the way to the new weights. Multiplicative reweighting compounds, and without
    them data-mix reweighting is known to collapse onto one domain.
    """

    type: Literal["natural", "uniform", "static", "ddk"] = "natural"
    weights: dict[str, float] | None = Field(
        default=None, description="static: weight per domain (normalised; every domain named)."
    )
    interval: int = Field(default=50, gt=0, description="ddk: steps between weight updates (paper: 1000).")
    alpha: float = Field(
        default=0.5, ge=0, le=1, description="ddk: smoothing; 1 - alpha of uniform mixed in."
    )
    eval_sequences: int = Field(
        default=32, gt=0, description="ddk: held-out sequences per domain per update."
    )
    min_weight: float | dict[str, float] | None = Field(
        default=None,
        description="ddk: lowest weight of a domain (one number, or per domain); default half the uniform share.",
    )
    max_weight: float | dict[str, float] | None = Field(
        default=None,
        description="ddk: highest weight of a domain (one number, or per domain); default twice the uniform "
        "share (at most 1).",
    )
    smoothing: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="ddk: share of the old weights kept at each update, r = s * r_old + (1 - s) * r_new.",
    )

    @model_validator(mode="after")
    def _weights(self) -> MixtureConfig:
        if self.type == "static":
            if not self.weights:
                raise ValueError("type static needs `weights` (a weight per domain)")
            bad = {k: v for k, v in self.weights.items() if v < 0}
            if bad or sum(self.weights.values()) <= 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        elif self.weights is not None:
            raise ValueError(f"`weights` applies to type static only (type is {self.type})")
        for key in ("min_weight", "max_weight"):
            value = getattr(self, key)
            if value is None:
                continue
            if self.type != "ddk":
                raise ValueError(f"`{key}` applies to type ddk only (type is {self.type})")
            values = value.values() if isinstance(value, dict) else [value]
            if any(not 0.0 <= v <= 1.0 for v in values):
                raise ValueError(f"`{key}` must lie in [0, 1], got {value}")
        return self

    def weight_bounds(self, domains: list[str]) -> dict[str, tuple[float, float]]:
        """DDK's (min, max) weight per domain, defaults filled in; `ValueError` naming the key when a
        per-domain value names no domain, a domain's min exceeds its max, or no weights fit the bounds."""
        uniform = 1.0 / len(domains)
        low = self._per_domain("min_weight", self.min_weight, domains, 0.5 * uniform)
        high = self._per_domain("max_weight", self.max_weight, domains, min(1.0, 2.0 * uniform))
        crossed = [d for d in domains if low[d] > high[d]]
        if crossed:
            raise ValueError(
                f"data.mixture: min_weight exceeds max_weight for {crossed} "
                f"(min {[low[d] for d in crossed]}, max {[high[d] for d in crossed]})"
            )
        if sum(low.values()) > 1.0 + 1e-9 or sum(high.values()) < 1.0 - 1e-9:
            raise ValueError(
                f"data.mixture: no weights summing to 1 fit the bounds over {len(domains)} domains "
                f"(min_weight sums to {sum(low.values()):.4g}, max_weight to {sum(high.values()):.4g}; "
                "the mins must sum to at most 1 and the maxes to at least 1)"
            )
        return {d: (low[d], high[d]) for d in domains}

    @staticmethod
    def _per_domain(
        key: str, value: float | dict[str, float] | None, domains: list[str], default: float
    ) -> dict[str, float]:
        if value is None:
            return dict.fromkeys(domains, default)
        if not isinstance(value, dict):
            return dict.fromkeys(domains, float(value))
        unknown = sorted(set(value) - set(domains))
        if unknown:
            raise ValueError(
                f"data.mixture.{key} names {unknown}, which are not domains (domains: {domains})"
            )
        return {d: float(value.get(d, default)) for d in domains}


class DataConfig(Section):
    """The `prepare` stage: stream, tokenize, pack into `seq_len + 1` token sequences, split held-out."""

    demo_corpus: DemoCorpusConfig | None = Field(
        default=None, description="If set, the campaign first assembles the demo corpus."
    )
    tokenizer: TokenizerConfig
    domains: dict[str, DomainConfig] = Field(min_length=1)
    seq_len: int = Field(
        ge=2, description="Tokens a model sees per sequence; stored sequences hold seq_len + 1."
    )
    heldout_sequences: int = Field(default=64, ge=0, description="Held-out sequences per domain.")
    heldout_fraction: float = Field(
        default=0.05, gt=0.0, le=1.0, description="Share of documents routed to held-out until it is full."
    )
    dir: AbsPath = Field(description="Output directory of the prepared token stores.")
    workers: int = Field(default=2, ge=1, le=256, description="Tokenizer worker processes.")
    batch_chars: int = Field(
        default=100_000,
        ge=1,
        description="Characters of text per worker task (small tasks keep workers balanced).",
    )
    checkpoint_seconds: float = Field(
        default=30.0, ge=0.0, description="How often progress is saved so an interrupted prepare resumes."
    )
    on_bad_record: Literal["error", "skip"] = Field(
        default="error",
        description="A record that is not a document (not UTF-8, not JSON, no text field, NUL bytes, too long, "
        "an empty file): stop naming file and line, or skip it and count it per source and reason.",
    )
    invalid_utf8: Literal["error", "replace"] = Field(
        default="error",
        description="Invalid UTF-8 in a text/JSON record: a bad record, or decoded with U+FFFD and counted.",
    )
    max_record_bytes: int = Field(
        default=64 << 20,
        ge=1024,
        description="A longer line/paragraph/document is a bad record (bounds memory).",
    )
    max_bad_records: int | None = Field(
        default=None, ge=0, description="skip: more bad records than this in one source is an error."
    )
    max_bad_fraction: float | None = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="skip: a larger share of bad records in a source is an error.",
    )

    mixture: MixtureConfig = MixtureConfig()

    @model_validator(mode="after")
    def _mixture_domains(self) -> DataConfig:
        weights = self.mixture.weights
        if weights is not None and set(weights) != set(self.domains):
            missing, unknown = (
                sorted(set(self.domains) - set(weights)),
                sorted(set(weights) - set(self.domains)),
            )
            raise ValueError(
                f"mixture.weights must name every domain exactly: missing {missing}, unknown {unknown}"
            )
        if self.mixture.type == "ddk":
            self.mixture.weight_bounds(list(self.domains))
        return self

    @field_validator("domains")
    @classmethod
    def _domain_names(cls, domains: dict[str, DomainConfig]) -> dict[str, DomainConfig]:
        bad = [name for name in domains if not _DOMAIN_NAME.match(name)]
        if bad:
            raise ValueError(
                f"domain names must match {_DOMAIN_NAME.pattern} (used as directory names): {bad}"
            )
        return domains
