"""Training checkpoints on disk: the directory layout and the atomic save protocol every engine uses.

Layout of a checkpoint root:
    latest                  name of the newest complete checkpoint, replaced atomically, last
    step_00000100/          the engine's files (megatron-core: `dist_checkpointing` of model + optimizer
                            and rng/rank_*.safetensors; DeepSpeed: its partitions and the gathered HF
                            model in hf/), training_state.json (step, data position, schedules, ...),
                            tokenizer/ (its files) and distillery.json (metadata: engine, step, layout,
                            architecture), written last
    .step_00000200.partial  a save in progress (or one killed mid-way): never read

Every rank writes its files into the `.partial` directory (`begin_save`); only when all are written does
rank 0 add `distillery.json`, rename the directory to its final name and then move `latest`
(`commit_save`). A crash at any point leaves the previous checkpoint as `latest`, complete and loadable.
What the engines write in between: `distill/engine/megatron/checkpoint.py` (resharding to any tp x pp x
dp layout) and `distill/engine/zero/checkpoint.py`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from distill.atomic import atomic_write_json, atomic_write_text, fsync_dir, read_json
from distill.errors import DataError
from distill.hub import HubModel, ModelLocation, local_dir
from distill.tokenizer_files import copy_tokenizer_files

LATEST = "latest"
META = "distillery.json"
TOKENIZER = "tokenizer"
FORMAT = "distillery.checkpoint"
FORMAT_VERSION = 1  # raised whenever what a checkpoint holds changes; other versions are not read
TRAINING_STATE = "training_state.json"


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
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} is a checkpoint of another distillery build (format version {meta.get('format_version')}, "
            f"this build reads {FORMAT_VERSION}); choose another checkpoint directory"
        )
    return meta


def read_training_state(path: Path) -> dict[str, Any]:
    """The loop's training state of checkpoint `path` without loading weights ({} for an imported model)."""
    state_file = Path(path) / TRAINING_STATE
    return read_json(state_file) if state_file.is_file() else {}


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint directory or a checkpoint root (then its `latest`)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise DataError(f"{path} holds no complete checkpoint (neither {META} nor a '{LATEST}' pointer)")
    return found


def begin_save(root: Path, step: int, *, is_main: bool) -> tuple[Path, Path]:
    """Collective: an empty `.step_N.partial` directory for every rank to write into; returns
    (partial, final). A save killed earlier at this step is discarded."""
    root = Path(root)
    final = root / step_name(step)
    partial = root / f".{final.name}.partial"
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)  # dist_checkpointing wants it empty
    _barrier()
    return partial, final


def commit_save(
    partial: Path,
    final: Path,
    *,
    is_main: bool,
    training_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_dir: Path | None,
    keep_last: int | None,
) -> Path:
    """Collective, once every rank has written its files into `partial`: the main rank adds the
    training state, the tokenizer and `distillery.json` (last), renames the directory to `final` and
    moves `latest`. Before the rename nothing is a checkpoint; after it, a complete one."""
    _barrier()
    if is_main:
        atomic_write_json(partial / TRAINING_STATE, training_state)
        if tokenizer_dir is not None:
            (partial / TOKENIZER).mkdir()
            copy_tokenizer_files(tokenizer_dir, partial / TOKENIZER)
        atomic_write_json(partial / META, {"format": FORMAT, "format_version": FORMAT_VERSION, **meta})
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_dir(final.parent)
        atomic_write_text(final.parent / LATEST, final.name + "\n")
        if keep_last:
            _prune(final.parent, keep_last)
    _barrier()
    return final


def _barrier() -> None:
    """torch.distributed's barrier, imported here: reading checkpoints (commands that never save, such as
    `prepare`, `submit` or `status`) needs no torch."""
    import torch.distributed as dist

    dist.barrier()


def tokenizer_dir_of(path: ModelLocation) -> Path:
    """Where the tokenizer of the model at `path` is: an HF directory itself (a hub id: its snapshot); a
    checkpoint's copy (`tokenizer/`; a DeepSpeed engine's checkpoint: the HF directory it holds, `hf/`)."""
    if isinstance(path, HubModel):
        return local_dir(path, weights=False)
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    ckpt = resolve_checkpoint(path)
    return ckpt / "hf" if read_meta(ckpt).get("engine") == "deepspeed" else ckpt / TOKENIZER


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / META).is_file())
    for old in steps[:-keep_last]:
        shutil.rmtree(old)
