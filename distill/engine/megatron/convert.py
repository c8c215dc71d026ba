"""`import` (HF directory -> sharded training checkpoint) and `export` (checkpoint -> HF directory).

Import runs with tp x pp processes; each rank reads only its shard's slices from the safetensors and
the checkpoint is written with global shapes, so it loads into any layout later. Export runs in one
process: it loads any checkpoint into an unsharded model (dist_checkpointing reshards) and inverts
the name map. `load_as_hf` gives any model path as one `transformers` model (what eval scores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distill.checkpoint import TOKENIZER, resolve_checkpoint
from distill.engine.megatron.checkpoint import save_checkpoint
from distill.engine.megatron.weights import load_weights
from distill.errors import DataError
from distill.hub import ModelLocation, local_dir
from distill.models.hf_io import EXPORT_RECORD, HFCheckpoint, generation_config, write_hf_directory
from distill.models.hf_layout import to_hf_state_dict
from distill.models.model_card import CARD, model_card_of
from distill.models.weights import Weights, checkpoint_meta, find_weights
from parallel.distributed import ParallelContext, init_parallel, shutdown
from parallel.model import ModelArch, build_gpt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_hf(source: ModelLocation, out: Path, *, tp: int, pp: int) -> Path:
    """Collective over tp x pp ranks: write HF weights (a directory or hub id) as a step-0 sharded
    checkpoint under `out`."""
    hf_dir = local_dir(source)
    hf = HFCheckpoint(hf_dir)
    if hf.arch.num_experts:
        raise DataError(
            f"{source}: a mixture-of-experts model ({hf.arch.model_type}) is a teacher here, read from its Hugging "
            "Face directory by the cache stage or an online run; checkpoints (import/export) are for dense "
            "models (MoE students are out of scope)"
        )
    ctx = init_parallel(tp, pp, seed=0)
    try:
        if ctx.dims.dp != 1:
            raise DataError(
                f"import runs with exactly tp x pp = {tp * pp} processes, got {ctx.dims.world_size}"
            )
        model = build_gpt(hf.arch, ctx.dims, pp_rank=ctx.pp_rank)
        load_weights(model, Weights(hf.arch, Path(hf_dir), "hf"), ctx)
        return save_checkpoint(
            out,
            0,
            model=model,
            optimizer=None,
            training_state={},
            meta=checkpoint_meta(hf.arch, str(source)),
            ctx=ctx,
            tokenizer_dir=hf_dir,
        )
    finally:
        shutdown()


def full_state_dict(ckpt: Path, ctx: ParallelContext) -> tuple[dict[str, torch.Tensor], ModelArch]:
    """The unsharded fp32 parameters of a checkpoint (megatron names), in a world of one."""
    weights = find_weights(ckpt)
    model = build_gpt(weights.arch, ctx.dims, pp_rank=0)
    load_weights(model, weights, ctx)
    return {name: p.detach() for name, p in model.named_parameters()}, weights.arch


def export_hf(
    ckpt: Path,
    out: Path,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `ckpt` (any layout; a root means its latest) as a HF model directory; `record`
    (the campaign stage's completion record) is written inside it, so both appear together."""
    ckpt = resolve_checkpoint(ckpt)
    ctx = init_parallel(1, 1, seed=0)
    try:
        if ctx.dims.world_size != 1:
            raise DataError("export runs in a single process")
        params, arch = full_state_dict(ckpt, ctx)
        tokenizer = ckpt / TOKENIZER if (ckpt / TOKENIZER).is_dir() else None
        card = model_card_of(ckpt, arch, Path(out))
        write_hf_directory(
            out,
            to_hf_state_dict(params, arch),
            arch,
            tokenizer_dir=tokenizer,
            dtype=DTYPES[dtype],
            generation=generation_config(tokenizer),
            overwrite=overwrite,
            extra_files={
                CARD: card,
                **({EXPORT_RECORD: json.dumps(record, indent=2) + "\n"} if record else {}),
            },
        )
        return Path(out)
    finally:
        shutdown()


def load_as_hf(path: ModelLocation, *, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Path]:
    """Any model path (HF directory, checkpoint step or root, any layout) as one unsharded
    `transformers` causal LM in this process, with the directory holding its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress is shown; its per-tensor bar is noise
    weights = find_weights(path)
    if weights.kind == "hf":
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(weights.directory), dtype=dtype, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{weights.directory} does not load with AutoModelForCausalLM: {exc}") from None
        return model.eval(), weights.directory
    ctx = init_parallel(1, 1, seed=0)
    try:
        if ctx.dims.world_size != 1:
            raise DataError("loading a checkpoint as one model runs in a single process")
        params, arch = full_state_dict(weights.directory, ctx)
        state = to_hf_state_dict(params, arch)
    finally:
        shutdown()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch.to_hf_config()), dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (arch.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise DataError(
            f"{weights.directory}: weights do not match the architecture ({missing + unexpected})"
        )
    model.tie_weights()
    return model.eval(), weights.tokenizer_dir
