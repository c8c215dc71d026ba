"""Sharded training checkpoints: saved atomically, loadable into any tp x pp x dp layout.

Layout of a checkpoint root:
    latest                  name of the newest complete checkpoint, replaced atomically, last
    step_00000100/          megatron-core `dist_checkpointing` (torch_dist) of model + optimizer,
                            the common training state (step, data position, schedules, ...),
                            rng/rank_*.pt (per-rank RNG states), tokenizer/ (its files) and
                            distillery.json (metadata: step, layout, architecture), written last
    .step_00000200.partial  a save in progress (or one killed mid-way): never read

Every rank writes its shards into the `.partial` directory; only when all are written does rank 0 add
`distillery.json`, rename the directory to its final name and then move `latest`. A crash at any
point leaves the previous checkpoint as `latest`, complete and loadable. Tensors are saved with their
global shapes and offsets, so a checkpoint written at tp2 pp1 loads at tp1 pp2 (resharding); RNG
states are restored only into the layout that wrote them (elsewhere they have no meaning).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distill.atomic import atomic_write_json, atomic_write_text, fsync_dir, read_json
from distill.errors import DataError
from distill.models.hf_io import copy_tokenizer_files
from parallel.distributed import ParallelContext

LATEST = "latest"
META = "distillery.json"
TOKENIZER = "tokenizer"
FORMAT = "distillery.checkpoint"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None if there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / META).is_file():
        raise DataError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise DataError(f"{path} is not a distillery checkpoint (no {META})")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path} is not a {FORMAT} file")
    return meta


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint directory or a checkpoint root (then its `latest`)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise DataError(f"{path} holds no complete checkpoint (neither {META} nor a '{LATEST}' pointer)")
    return found


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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

    root = Path(root)
    final = root / step_name(step)
    partial = root / f".{final.name}.partial"
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # a save killed earlier at this step
        partial.mkdir(parents=True)  # dist_checkpointing wants it empty
    dist.barrier()
    sharded: dict[str, Any] = {"model": model.sharded_state_dict(), "training_state": training_state}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"])
    dist_checkpointing.save(sharded, str(partial))
    (partial / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), partial / "rng" / f"rank_{ctx.rank:05d}.pt")
    dist.barrier()
    if ctx.is_main:
        if tokenizer_dir is not None:
            (partial / TOKENIZER).mkdir()
            copy_tokenizer_files(tokenizer_dir, partial / TOKENIZER)
        atomic_write_json(
            partial / META,
            {
                "format": FORMAT,
                "step": step,
                "layout": {"tp": ctx.dims.tp, "pp": ctx.dims.pp, "dp": ctx.dims.dp},
                "has_optimizer": optimizer is not None,
                **meta,
            },
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, final.name + "\n")
        if keep_last:
            _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / META).is_file())
    for old in steps[:-keep_last]:
        shutil.rmtree(old)


def load_checkpoint(
    path: Path, *, model: torch.nn.Module, optimizer: Any | None, ctx: ParallelContext
) -> dict[str, Any]:
    """Collective: load into this rank's shard of `model` (and `optimizer` when the checkpoint has
    one and one is given). Returns the metadata plus `training_state` (empty for an imported model)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    sharded: dict[str, Any] = {"model": model.sharded_state_dict()}
    with_optimizer = optimizer is not None and meta["has_optimizer"]
    if with_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path))
    model.load_state_dict(loaded["model"])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    layout = {"tp": ctx.dims.tp, "pp": ctx.dims.pp, "dp": ctx.dims.dp}
    rng_file = Path(path) / "rng" / f"rank_{ctx.rank:05d}.pt"
    if meta["layout"] == layout and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return {**meta, "training_state": loaded.get("training_state", {})}
