"""megatron-core checkpoints: model and optimizer as `dist_checkpointing` shards, loadable at any layout.

Inside the step directory of the common protocol (`distill/checkpoint.py`: `begin_save`, `commit_save`):
the sharded state dicts of the GPTModel and its optimizer (torch_dist format, tensors with their global
shapes and offsets, so a checkpoint written at tp2 pp1 loads at tp1 pp2) and each rank's RNG states
(`rng/rank_*.safetensors`, restored only into the layout that wrote them: elsewhere they mean nothing).

Nothing in a checkpoint is unpickled freely: our own state is JSON and safetensors, and megatron's
files are loaded under `distill.unpickling.no_code_execution` (see there for the audit).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from distill.atomic import read_json
from distill.checkpoint import TRAINING_STATE, begin_save, commit_save, read_meta
from distill.errors import DataError
from distill.unpickling import UnsafeCheckpointError, no_code_execution, refusal_reason
from parallel.distributed import ParallelContext


def _rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as named uint8 tensors (what safetensors stores)."""
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state()}
    for name, tracked in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = tracked
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return {k: v.contiguous() for k, v in state.items()}


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tracker = {k.removeprefix("tracker."): v for k, v in state.items() if k.startswith("tracker.")}
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _read_rng_file(path: Path) -> dict[str, torch.Tensor] | None:
    """The RNG states in `path.safetensors`, or None when the checkpoint has none for this rank."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safe = path.with_suffix(".safetensors")
    if safe.is_file():
        try:
            return load_file(safe)
        except SafetensorError as exc:
            raise DataError(f"{safe} is not a readable safetensors file ({exc})") from None
    return None


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: Any | None,
    training_state: dict[str, Any],
    meta: dict[str, Any],
    ctx: ParallelContext,
    tokenizer_dir: Path | None = None,
    keep_last: int | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    `tokenizer_dir`'s tokenizer files are copied in, so a checkpoint exports to a complete HF
    directory on its own."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    partial, final = begin_save(root, step, is_main=ctx.is_main)
    sharded: dict[str, Any] = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"])
    dist_checkpointing.save(sharded, str(partial))
    (partial / "rng").mkdir(exist_ok=True)
    save_file(_rng_state(), str(partial / "rng" / f"rank_{ctx.rank:05d}.safetensors"))
    layout = {"tp": ctx.dims.tp, "pp": ctx.dims.pp, "dp": ctx.dims.dp}
    return commit_save(
        partial,
        final,
        is_main=ctx.is_main,
        training_state=training_state,
        meta={
            "engine": "megatron",
            "step": step,
            "layout": layout,
            "has_optimizer": optimizer is not None,
            **({"optimizer": optimizer.kind} if optimizer is not None else {}),
            **meta,
        },
        tokenizer_dir=tokenizer_dir,
        keep_last=keep_last,
    )


def load_checkpoint(
    path: Path, *, model: torch.nn.Module, optimizer: Any | None, ctx: ParallelContext
) -> dict[str, Any]:
    """Collective: load into this rank's shard of `model` (and `optimizer` when the checkpoint has
    one and one is given). Returns the metadata plus `training_state` (empty for an imported model)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    if meta.get("engine", "megatron") != "megatron":
        raise DataError(
            f"{path} was written by the {meta['engine']} engine; resume it with engine: {meta['engine']}, or start "
            f"from its weights (student.init: {path}) in a new checkpoint.dir"
        )
    sharded: dict[str, Any] = {"model": model.sharded_state_dict()}
    with_optimizer = optimizer is not None and meta["has_optimizer"]
    if with_optimizer and meta.get("optimizer", "adamw") != optimizer.kind:
        raise DataError(
            f"{path} holds {meta.get('optimizer', 'adamw')} optimizer state, this run uses {optimizer.kind} "
            "(training.distributed_optimizer); resume with the optimizer it was saved with, or start from its "
            f"weights (student.init: {path}) in a new checkpoint.dir"
        )
    if with_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True)
    try:
        with no_code_execution(), warnings.catch_warnings():
            # megatron-core 0.16.1 calls torch's deprecated alias of `load`; nothing a user can act on
            warnings.filterwarnings("ignore", r"`load_state_dict` is deprecated", FutureWarning)
            warnings.filterwarnings("ignore", r"Please use DTensor instead", FutureWarning)
            loaded = dist_checkpointing.load(sharded, str(path))
    except Exception as exc:  # megatron wraps load errors; an unsafe file is a user-facing refusal
        cause = _unsafe_cause(exc)
        if cause is None:
            raise
        raise UnsafeCheckpointError(f"checkpoint {path}: {cause}") from None
    model.load_state_dict(loaded["model"])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    layout = {"tp": ctx.dims.tp, "pp": ctx.dims.pp, "dp": ctx.dims.dp}
    if meta["layout"] == layout:  # every save writes each rank's RNG state: a missing one is damage
        rng = _read_rng_file(Path(path) / "rng" / f"rank_{ctx.rank:05d}")
        if rng is None:
            raise DataError(
                f"checkpoint {path} has no RNG state for rank {ctx.rank} (rng/rank_{ctx.rank:05d}.safetensors): "
                "it is damaged; resume from an earlier checkpoint, or start from its weights (student.init)"
            )
        _set_rng_state(rng)
    state_file = Path(path) / TRAINING_STATE
    training_state = read_json(state_file) if state_file.is_file() else {}
    return {**meta, "training_state": training_state}


def _unsafe_cause(exc: BaseException | None) -> str | None:
    """The refusal message if `exc` (or what caused it) is an unsafe-unpickling refusal."""
    while exc is not None:
        if isinstance(exc, UnsafeCheckpointError):
            return str(exc)
        if isinstance(exc, pickle.UnpicklingError):
            return f"refusing to unpickle a file that holds more than tensors and plain data ({refusal_reason(exc)})"
        exc = exc.__cause__ or exc.__context__
    return None
