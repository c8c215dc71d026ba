"""Where a model's weights come from, and the one function that loads them into a sharded model.

A model path names either a Hugging Face directory (`config.json` + safetensors) or a distillery
checkpoint (a step directory, or a checkpoint root whose `latest` is taken; a DeepSpeed engine's
checkpoint is read through the HF directory it holds, `hf/`). `find_weights` says which
and reads the architecture; each engine loads them its own way (megatron-core:
`distill/engine/megatron/weights.py`; DeepSpeed: `from_pretrained` of the HF directory).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from distill.checkpoint import TOKENIZER, read_meta, resolve_checkpoint
from distill.hub import ModelLocation, local_dir
from distill.models.hf_io import HFCheckpoint
from parallel.model import ModelArch


@dataclass(frozen=True)
class Weights:
    arch: ModelArch
    directory: Path  # the HF directory, or the resolved checkpoint step directory
    kind: Literal["hf", "checkpoint"]

    @property
    def tokenizer_dir(self) -> Path:
        """Where the model's tokenizer files are (a checkpoint keeps a copy in `tokenizer/`)."""
        return self.directory / TOKENIZER if self.kind == "checkpoint" else self.directory


def find_weights(path: ModelLocation) -> Weights:
    """The weights at `path`: an HF directory or hub id (its snapshot), or a checkpoint (step directory or
    root)."""
    path = local_dir(path)
    if (path / "config.json").is_file():
        return Weights(HFCheckpoint(path).arch, path, "hf")
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("engine") == "deepspeed":  # its whole model, gathered at save time, is an HF directory
        return Weights(ModelArch.from_json(meta["arch"]), ckpt / "hf", "hf")
    return Weights(ModelArch.from_json(meta["arch"]), ckpt, "checkpoint")


def directory_sha256(path: Path) -> str:
    """Content hash of a model directory (config + weights), independent of its location."""
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in Path(path).rglob("*")
        if p.is_file() and p.suffix in (".json", ".safetensors", ".distcp", ".pt")
    )
    for file in files:
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def checkpoint_meta(arch: ModelArch, source: str) -> dict[str, Any]:
    return {"arch": arch.to_json(), "source": source}
