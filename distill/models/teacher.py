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
from distill.models.convert import start_weights, tokenizer_of
from distill.models.hf_io import HFCheckpoint
from distill.models.hf_layout import Shard
from parallel.distributed import ParallelContext
from parallel.model import ModelArch, build_gpt, precision_dtype


def open_teacher(path: Path, *, tokenizer_sha256: str, data_dir: Path) -> tuple[ModelArch, Path, str]:
    """(architecture, weights directory, "hf" | "checkpoint") of the teacher at `path`."""
    arch, source, kind = start_weights(path)
    found = load_tokenizer(tokenizer_of(source, kind)).sha256
    if found != tokenizer_sha256:
        raise DataError(
            f"teacher.path {path}: its tokenizer (sha256 {found[:12]}) is not the one {data_dir} was "
            f"prepared with ({tokenizer_sha256[:12]}); cross-tokenizer distillation needs ULD"
        )
    return arch, source, kind


def load_teacher(arch: ModelArch, source: Path, kind: str, ctx: ParallelContext, precision: str) -> Any:
    """This rank's shard of the teacher (layers of its pipeline stage, vocabulary slice), eval mode."""
    from distill.checkpoint import load_checkpoint

    model = build_gpt(arch, ctx.dims, pp_rank=ctx.pp_rank, dtype=precision_dtype(precision))
    if kind == "hf":
        HFCheckpoint(source).load_into(model, Shard(arch, ctx.dims, ctx.tp_rank, ctx.pp_rank))
    else:
        load_checkpoint(source, model=model, optimizer=None, ctx=ctx)
    return model.eval()
