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
from distill.errors import DataError
from distill.hub import ModelLocation, local_dir
from distill.models.hf_arch import HFArch, describe
from distill.models.hf_io import HFCheckpoint
from parallel.errors import ParallelConfigError
from parallel.model import ModelArch


@dataclass(frozen=True)
class Weights:
    arch: ModelArch | HFArch  # HFArch: a causal LM that only `transformers` runs (no megatron mapping)
    directory: Path  # the HF directory, or the resolved checkpoint step directory
    kind: Literal["hf", "checkpoint"]

    @property
    def tokenizer_dir(self) -> Path:
        """Where the model's tokenizer files are (a checkpoint keeps a copy in `tokenizer/`)."""
        return self.directory / TOKENIZER if self.kind == "checkpoint" else self.directory

    @property
    def megatron_ready(self) -> bool:
        return isinstance(self.arch, ModelArch)

    def megatron_arch(self, key: str) -> ModelArch:
        """The megatron-core architecture, or an error saying why `key`'s model has none and what runs it."""
        if isinstance(self.arch, ModelArch):
            return self.arch
        way_out = (
            "a teacher of this type runs as a Hugging Face module: set teacher.engine to transformers or "
            "deepspeed (or leave it auto)"
            if key.startswith("teacher")
            else "a student is built by megatron-core or saved in its terms: start from a llama, mistral, "
            "qwen2 or qwen3 model (or student.arch)"
        )
        raise DataError(
            f"{key} {self.directory}: model_type {self.arch.model_type!r} has no megatron-core mapping "
            f"({self.arch.megatron}); {way_out}"
        )


def find_weights(path: ModelLocation) -> Weights:
    """The weights at `path`: an HF directory or hub id (its snapshot), or a checkpoint (step directory or
    root)."""
    path = local_dir(path)
    if (path / "config.json").is_file():
        hf = HFCheckpoint(path)
        try:
            return Weights(hf.arch, path, "hf")
        except ParallelConfigError as refusal:  # not megatron's: the HF path may still run it
            return Weights(describe(path, hf.config, str(refusal)), path, "hf")
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
