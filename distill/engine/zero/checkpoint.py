"""Checkpoints of the DeepSpeed engine: DeepSpeed's own files inside our atomic step directory.

Layout of a step directory (the root, `latest`, `.partial` and pruning are `distill/checkpoint.py`'s,
shared with the megatron engine):

    deepspeed/        `engine.save_checkpoint` (tag "deepspeed"): module states and every rank's ZeRO
                      partition of fp32 weights and Adam moments (`*_optim_states.pt`)
    hf/               the whole model gathered from its partitions (ZeRO-3: parameter by parameter, in the
                      model's own precision) as a Hugging Face directory: what `export`, `eval`, an online
                      teacher or another engine's `student.init` read; it is never an empty file
    rng/rank_*.safetensors, training_state.json, tokenizer/, distillery.json (engine "deepspeed", last)

Resuming needs the same number of ranks (ZeRO partitions are per rank); any other use reads `hf/`.
DeepSpeed's files are pickles: they are loaded with every `torch.load` forced weights-only and an
allow-list of three DeepSpeed classes that carry only data (`ZERO_ALLOWED`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distill.checkpoint import begin_save, commit_save, latest_checkpoint, read_meta, read_training_state
from distill.config.train import CheckpointConfig
from distill.errors import DataError
from distill.models.hf_io import generation_config, write_hf_directory
from distill.models.weights import checkpoint_meta
from distill.unpickling import no_code_execution
from parallel.model import ModelArch

TAG = "deepspeed"  # DeepSpeed's tag directory inside a step directory
HF = "hf"


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank_{rank:05d}.safetensors"


def zero_allowed() -> list[Any]:
    """The DeepSpeed classes its optimizer-state files name: plain data holders (a loss scale, an enum,
    a named tuple of offsets)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def gathered_state_dict(module: torch.nn.Module, *, is_main: bool) -> dict[str, torch.Tensor]:
    """Collective: every parameter of `module` whole, on the main rank (empty elsewhere). Under ZeRO-3
    one parameter is gathered at a time, so no rank ever holds more than one extra full tensor."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():  # a tied output weight is named once
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            if is_main:
                if param.numel() == 0:
                    raise RuntimeError(f"{name} is still partitioned after gathering (empty tensor)")
                state[name] = param.detach().to("cpu", copy=True)
    return state


def save_zero_checkpoint(
    engine: Any,
    checkpoint: CheckpointConfig,
    step: int,
    *,
    training_state: dict[str, Any],
    arch: ModelArch,
    source: str,
    tokenizer_dir: Path,
    rank: int,
    dp_size: int,
    stage: int,
) -> Path:
    """Collective: DeepSpeed's partitions, the gathered HF model and our state, committed atomically."""
    from safetensors.torch import save_file

    is_main = rank == 0
    partial, final = begin_save(checkpoint.dir, step, is_main=is_main)
    engine.save_checkpoint(str(partial), tag=TAG, save_latest=False)
    _rng_file(partial, rank).parent.mkdir(exist_ok=True)
    rng = {"torch": torch.get_rng_state()} | (
        {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    )
    save_file(rng, str(_rng_file(partial, rank)))
    module = engine.module.model
    state = gathered_state_dict(module, is_main=is_main)
    if is_main:
        dtype = next(iter(state.values())).dtype
        write_hf_directory(
            partial / HF,
            state,
            arch,
            tokenizer_dir=tokenizer_dir,
            dtype=dtype,
            generation=generation_config(tokenizer_dir),
        )
    return commit_save(
        partial,
        final,
        is_main=is_main,
        training_state=training_state,
        meta={
            "engine": "deepspeed",
            "step": step,
            "layout": {"tp": 1, "pp": 1, "dp": dp_size},
            "zero_stage": stage,
            "has_optimizer": True,
            **checkpoint_meta(arch, source),
        },
        tokenizer_dir=tokenizer_dir,
        keep_last=checkpoint.keep_last,
    )


def load_zero_checkpoint(
    engine: Any, root: Path, *, rank: int, dp_size: int, stage: int
) -> dict[str, Any] | None:
    """Collective: load the latest checkpoint under `root` into `engine` (weights, ZeRO partitions of
    the optimizer, RNG) and return its training state; None when there is none yet."""
    from safetensors.torch import load_file

    latest = latest_checkpoint(root)
    if latest is None:
        return None
    meta = read_meta(latest)
    if meta.get("engine") != "deepspeed":
        raise DataError(
            f"{latest} was written by the {meta.get('engine', 'megatron')} engine; resume it with that engine, "
            f"or start engine deepspeed from its export (student.init) in a new checkpoint.dir"
        )
    if meta.get("zero_stage") != stage:
        raise DataError(
            f"{latest} holds ZeRO-{meta.get('zero_stage')} partitions and deepspeed.zero_stage is {stage}: resume with "
            f"zero_stage {meta.get('zero_stage')}, or start a new run from its weights (student.init: {latest / HF})"
        )
    if meta["layout"]["dp"] != dp_size:
        raise DataError(
            f"{latest} holds ZeRO partitions of {meta['layout']['dp']} ranks and this job has {dp_size}: resume "
            f"with {meta['layout']['dp']} ranks, or start a new run from its weights (student.init: {latest / HF})"
        )
    with no_code_execution(), torch.serialization.safe_globals(zero_allowed()):
        path, _ = engine.load_checkpoint(
            str(latest), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if path is None:
        raise DataError(f"{latest / TAG}: DeepSpeed found no checkpoint to load there")
    rng = load_file(str(_rng_file(latest, rank)))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    dist.barrier()
    return {**read_training_state(latest), "checkpoint": str(latest)}
