"""Reading and writing Hugging Face checkpoint directories (safetensors), shard by shard.

`HFCheckpoint.read(name, rows, cols)` returns one slice of one tensor through
`safetensors.safe_open(...).get_slice`, so an importing rank holds its own shard plus at most one
slice being copied, never the whole model. `write_hf_directory` writes what `from_pretrained` needs:
safetensors (split into files of at most `max_shard_bytes`, with an index), `config.json`,
`generation_config.json` and the tokenizer files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.atomic import atomic_directory, atomic_write_json, read_json
from distill.errors import DataError, OutputExistsError
from distill.models.hf_layout import Shard, hf_sources
from distill.tokenizer_files import copy_tokenizer_files
from parallel.model import ModelArch

EXPORT_RECORD = "distillery_export.json"  # what a campaign's export was made from (stage record)


class HFCheckpoint:
    """A local HF model directory: its config and lazy, sliced access to its safetensors."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        config = self.directory / "config.json"
        if not config.is_file():
            raise DataError(f"{self.directory} is not a Hugging Face model directory (no config.json)")
        self.config: dict[str, Any] = read_json(config)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map: dict[str, str] = read_json(index)["weight_map"]
        elif (self.directory / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(self.directory / "model.safetensors", "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise DataError(f"{self.directory} has no safetensors weights (model.safetensors or its index)")
        self._open: dict[str, Any] = {}

    @property
    def arch(self) -> ModelArch:
        return ModelArch.from_hf_config(self.config)

    def read(self, name: str, rows: slice, cols: slice) -> torch.Tensor:
        """Rows/columns of tensor `name` (columns ignored for 1-D tensors), read from disk."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise DataError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(self.directory / file, "pt")
        part = self._open[file].get_slice(name)
        return part[rows] if len(part.get_shape()) == 1 else part[rows, cols]

    def load_into(self, model: torch.nn.Module, shard: Shard) -> None:
        """Fill every parameter of this rank's model from the checkpoint, one slice at a time."""
        for name, param in model.named_parameters():
            value = hf_sources(name, shard)(self.read)
            if value.shape != param.shape:
                raise DataError(
                    f"{self.directory}: {name} expects shape {tuple(param.shape)}, got {tuple(value.shape)}"
                )
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
            del value


def write_hf_directory(
    out: Path,
    state_dict: dict[str, torch.Tensor],
    arch: ModelArch,
    *,
    tokenizer_dir: Path | None,
    dtype: torch.dtype,
    generation: dict[str, Any],
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
) -> None:
    """Write a complete HF model directory atomically (it appears only when every file is in it)."""
    from safetensors.torch import save_file

    if Path(out).exists() and not overwrite:
        raise OutputExistsError(
            f"{out} already exists; choose another directory or pass --overwrite to replace it"
        )
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, part in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(part, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(part, file))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            atomic_write_json(
                tmp / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        dtype_name = str(dtype).removeprefix("torch.")
        atomic_write_json(tmp / "config.json", arch.to_hf_config(dtype=dtype_name))
        atomic_write_json(tmp / "generation_config.json", {"_from_model_config": False, **generation})
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def generation_config(tokenizer_dir: Path | None) -> dict[str, Any]:
    """bos/eos/pad ids for generation_config.json, from the tokenizer's own config when present."""
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}
