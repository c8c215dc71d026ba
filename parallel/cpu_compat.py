"""Make megatron-core 0.16 run on CPU (gloo), applied only when CUDA is absent.

megatron-core assumes a GPU in a handful of places that matter for us: `torch.cuda.current_device()`
as a tensor device, `device="cuda"` literals in the pipeline schedules and grad buffers, `.cuda()` calls,
`torch.cuda.synchronize()`, and a CUDA RNG tracker for tensor-parallel dropout regions. On a machine
without CUDA each of those fails. This module maps them to the CPU:

- `torch.cuda.current_device()` -> `"cpu"` (used only as a `device=` argument there),
- `Tensor.cuda()` -> the tensor itself, `torch.cuda.synchronize()` -> no-op,
- `device="cuda"` / `device=torch.device("cuda")` in tensor factories -> CPU, through a
  `torch.overrides.TorchFunctionMode` that stays active for the life of the process,
- the RNG tracker's state functions -> the CPU default generator (fork/restore semantics unchanged),
- `dist_checkpointing`'s file writer writes its buckets in this process instead of forked children:
  a child forked from a gloo rank (other threads hold locks) can wait forever on a lock no thread of it
  will release; a test's save hung that way once in a handful of full runs (`_write_buckets_here`).

Everything is reversible (`restore()`), and `apply()` is a no-op on a CUDA machine, where megatron-core
runs unmodified. `tests/unit/test_cpu_compat.py` shows each piece failing without the layer and working
with it.

`apply()` also imports megatron-core with `torch.compile` standing in as the identity decorator: at import
megatron-core wraps its fused kernels in `torch.compile` (`megatron.core.jit.jit_fuser`), which loads
TorchInductor (~2 s per process here) for kernels a CPU run never calls; they stay plain eager functions.

`apply()` also silences the warnings megatron-core prints on every CPU run that say only "there is no
GPU stack here" (`KNOWN_CPU_WARNINGS`: each its exact message and emitting module). It installs them
before it first imports megatron-core, because several are printed at import time. They stay installed
after `restore()` (which undoes the CPU mappings only); on a CUDA machine every warning shows as usual.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_saved: dict[str, Any] = {}
_mode: TorchFunctionMode | None = None

# (message regex, module regex) of megatron-core 0.16.1's UserWarnings that every CPU run prints and
# that mean nothing there: the fused kernels of Apex / Transformer Engine (GPU-only packages) are
# absent, CUDA_DEVICE_MAX_CONNECTIONS is a CUDA stream setting, and "full scope" is the default value
# of TransformerConfig.cuda_graph_scope (CUDA graphs), deprecated by megatron-core itself.
KNOWN_CPU_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"Transformer Engine and Apex are not installed\. Falling back to (Torch optimizers\.|local "
        r"implementations of multi_tensor_applier(, multi_tensor_l2norm,)? and multi_tensor_scale)$",
        r"megatron\.core\.(optimizer|optimizer\.optimizer|optimizer\.clip_grads"
        r"|distributed\.fsdp\.src\.megatron_fsdp\.mixed_precision)$",
    ),
    (
        r"Apex is not installed\. Falling back to Torch Norm$",
        r"megatron\.core\.models\.(backends|gpt\.gpt_layer_specs)$",
    ),
    (
        r"When using (async grad allreduce|sequence parallelism) it is recommended to set the environment "
        r"variable CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup$",
        r"megatron\.core\.tensor_parallel\.layers$",
    ),
    (
        r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer\.$",
        r"megatron\.core\.transformer\.transformer_config$",
    ),
)


def _is_cuda(device: object) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites `device="cuda..."` keyword arguments of any torch function to the CPU."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _write_buckets_here(
    transform_list: list, use_msc: bool, rank: int, write_buckets: list, global_results_queue: Any
) -> None:
    """megatron-core 0.16.1's `FileSystemWriterAsync.write_preloaded_data_multiproc`, without its forked
    processes: each bucket is written by the same `write_preloaded_data` in turn, here, with in-process
    queues; the results (or the first exception) reach `global_results_queue` as megatron expects."""
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results: queue.Queue = queue.Queue()
    counts: queue.Queue = queue.Queue()
    outcome: dict[int, Any] | Exception = {}
    for index, bucket in enumerate(write_buckets):
        counts.put(index)
        FileSystemWriterAsync.write_preloaded_data(
            transform_list, index, bucket, results, counts, True, use_msc=use_msc
        )
        local_index, written = results.get()
        if isinstance(written, Exception):
            outcome = written
            break
        outcome[local_index] = written
    global_results_queue.put(outcome)


def needed() -> bool:
    return not torch.cuda.is_available()


def applied() -> bool:
    return _mode is not None


def quiet_known_warnings() -> None:
    """Ignore `KNOWN_CPU_WARNINGS` (idempotent: `warnings` keeps one copy of each filter)."""
    for message, module in KNOWN_CPU_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)


def apply() -> None:
    """Install the CPU mappings and warning filters (idempotent; does nothing when CUDA is available).

    Call it before the first import of megatron-core, whose import prints some of those warnings. The
    filters are installed again on every call, since `warnings.catch_warnings` blocks drop them."""
    global _mode
    if not needed():
        return
    quiet_known_warnings()
    if applied():
        return
    _import_megatron_without_compile()
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.tensor_parallel import random as mcore_random

    _saved.update(
        write_multiproc=FileSystemWriterAsync.__dict__["write_preloaded_data_multiproc"],
        current_device=torch.cuda.current_device,
        synchronize=torch.cuda.synchronize,
        tensor_cuda=torch.Tensor.cuda,
        get_rng_state=torch.cuda.get_rng_state,
        manual_seed=torch.cuda.manual_seed,
        mcore_get=mcore_random._get_cuda_rng_state,
        mcore_set=mcore_random._set_cuda_rng_state,
    )
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)  # type: ignore[assignment]
    mcore_random._get_cuda_rng_state = lambda *args, clone=False, **kwargs: (  # type: ignore[assignment]
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)  # type: ignore[assignment]
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_write_buckets_here)  # type: ignore[method-assign]
    _mode = _CudaDeviceToCpu()
    _mode.__enter__()


def _eager(model: Any = None, **_options: Any) -> Any:
    """`torch.compile`'s two call forms, compiling nothing: `compile(fn)` and `compile(**options)(fn)`."""
    return model if model is not None else (lambda fn: fn)


def _import_megatron_without_compile() -> None:
    """Import megatron-core with `torch.compile` as `_eager` (its jit fuser keeps the identity for good)."""
    import sys

    if "megatron.core" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = _eager  # type: ignore[assignment]
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_  # type: ignore[assignment]


def restore() -> None:
    """Undo `apply()` (used by the tests that show what the layer makes work)."""
    global _mode
    if _mode is None:
        return
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.tensor_parallel import random as mcore_random

    FileSystemWriterAsync.write_preloaded_data_multiproc = _saved["write_multiproc"]  # type: ignore[method-assign]
    _mode.__exit__(None, None, None)
    _mode = None
    torch.cuda.current_device = _saved["current_device"]
    torch.cuda.synchronize = _saved["synchronize"]
    torch.Tensor.cuda = _saved["tensor_cuda"]
    torch.cuda.get_rng_state = _saved["get_rng_state"]
    torch.cuda.manual_seed = _saved["manual_seed"]
    mcore_random._get_cuda_rng_state = _saved["mcore_get"]
    mcore_random._set_cuda_rng_state = _saved["mcore_set"]
