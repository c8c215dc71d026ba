"""The teacher model, for the cache stage and for online distillation alike.

`open_teacher` finds what `teacher.path` holds (HF directory or distillery checkpoint) and refuses a
teacher whose tokenizer is not the one the data was prepared with (same-tokenizer distillation; other
tokenizers need ULD). `load_teacher` builds this rank's shard of it, in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.data.tokenizer import load_tokenizer
from distill.errors import DataError
from distill.models.weights import Weights, find_weights, load_weights
from parallel.distributed import ParallelContext
from parallel.model import build_gpt, precision_dtype


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


def load_teacher(weights: Weights, ctx: ParallelContext, precision: str) -> Any:
    """This rank's shard of the teacher (layers of its pipeline stage, vocabulary slice), eval mode."""
    model = build_gpt(weights.arch, ctx.dims, pp_rank=ctx.pp_rank, dtype=precision_dtype(precision))
    load_weights(model, weights, ctx)
    return model.eval()
