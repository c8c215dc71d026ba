"""The teacher model, for the cache stage and for online distillation alike.

`open_teacher` finds what `teacher.path` holds (HF directory or distillery checkpoint) and refuses a
teacher whose tokenizer is not the one the data was prepared with (same-tokenizer distillation; other
tokenizers need ULD). Each engine builds its shard of it (`frozen_model`).
"""

from __future__ import annotations

from pathlib import Path

from distill.data.tokenizer import load_tokenizer
from distill.errors import DataError
from distill.models.weights import Weights, find_weights


def open_teacher(path: Path, *, tokenizer_sha256: str, data_dir: Path) -> Weights:
    """The teacher's weights at `path`, checked to share the prepared data's tokenizer."""
    weights = find_weights(path)
    found = load_tokenizer(weights.tokenizer_dir).sha256
    if found != tokenizer_sha256:
        raise DataError(
            f"teacher.path {path}: its tokenizer (sha256 {found[:12]}) is not the one {data_dir} was "
            f"prepared with ({tokenizer_sha256[:12]}); cross-tokenizer distillation needs ULD"
        )
    return weights
