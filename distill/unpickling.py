"""Loading checkpoints without letting their files run code.

A pickle can name any importable callable and have it called while loading, so a checkpoint copied from
elsewhere must never be unpickled freely. What distillery itself writes is safe to read by construction:
training state is JSON (`training_state.json`), RNG states are safetensors. What megatron-core's
`dist_checkpointing` (torch_dist) writes and reads is not all ours; the audit, for torch 2.13 and
megatron-core 0.16.1:

- `common.pt` (megatron's non-sharded state: optimizer param groups):
  `torch.load` with the default `weights_only=True` -> safe;
- sharded objects `*.pt` (none in our checkpoints): `torch.load` default -> safe;
- `.metadata` (torch.distributed.checkpoint's index of tensors and byte items): `pickle.load` upstream;
- byte items such as megatron's `*._extra_state`: `torch.load(..., weights_only=False)` upstream.

`no_code_execution()` closes the last two for the duration of a load: `.metadata` is read by an
unpickler that resolves only an allow-list of torch.distributed.checkpoint's plain data classes
(`ALLOWED_GLOBALS`), and `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` makes every `torch.load` in between
weights-only (torch's documented override). A file that names anything else is refused with
`UnsafeCheckpointError` naming what it asked for. Inter-process pickles (`all_gather_object`, worker
pools) carry only what our own ranks send and are not checkpoint input.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import types
from collections.abc import Iterator
from typing import IO, Any

from distill.errors import DataError

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id of a plain torch.distributed.checkpoint save
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        *(
            ("torch.distributed.checkpoint.planner", name)
            for name in ("SavePlan", "TensorWriteData", "WriteItem", "WriteItemType")
        ),
    }
)


class UnsafeCheckpointError(DataError):
    """A checkpoint file asks to import something outside the allow-list: it is not loaded."""


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} asks to load {module}.{name}, which is not plain checkpoint data; refusing to "
            "unpickle it (a checkpoint that names arbitrary callables can run code when loaded)"
        )


def _is_dtype(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def refusal_reason(exc: BaseException) -> str:
    """What a weights-only `torch.load` refused, without torch's advice to load unsafely instead."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(exc).__name__])[0]


def restricted_load(file: IO[bytes], source: str = "checkpoint metadata") -> Any:
    """Unpickle `file` resolving only `ALLOWED_GLOBALS` (and torch dtypes)."""
    return _AllowListUnpickler(file, source).load()


def restricted_loads(data: bytes, source: str = "checkpoint metadata") -> Any:
    return restricted_load(io.BytesIO(data), source)


@contextlib.contextmanager
def no_code_execution() -> Iterator[None]:
    """Within this block, checkpoint loads through torch.distributed.checkpoint and `torch.load` cannot
    run code: see the module docstring. Not re-entrant across threads (it swaps a module global)."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    shim = types.SimpleNamespace(
        load=restricted_load, loads=restricted_loads, dump=pickle.dump, dumps=pickle.dumps
    )
    saved_env = {
        k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    saved_pickle = dcp_filesystem.pickle
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    dcp_filesystem.pickle = shim  # type: ignore[assignment]
    try:
        yield
    finally:
        dcp_filesystem.pickle = saved_pickle
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
