"""Process start-up: the torch.distributed world, megatron-core's process groups, seeds.

`init_parallel` is the only place that calls `parallel_state.initialize_model_parallel`; everything
downstream receives a `ParallelContext` and passes its groups explicitly (to losses, grad-norm
reductions, the data sampler) instead of reading globals. Without CUDA the backend is gloo and the
megatron-core CPU compatibility layer is applied; with CUDA it is NCCL and megatron-core runs as is.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel import cpu_compat
from parallel.dims import ParallelDims


@dataclass(frozen=True)
class ParallelContext:
    dims: ParallelDims
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup  # tp x pp: everything one model replica spans
    device: torch.device
    ep_rank: int = 0  # this rank's slice of each MoE layer's experts

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def is_main(self) -> bool:
        """The one process that writes shared files and prints summaries."""
        return self.rank == 0


def _single_process_env() -> None:
    """Let `python -m ...` without torchrun form a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def join_world() -> torch.device:
    """Join the torch.distributed world (torchrun's environment, or a world of one): NCCL on this
    rank's GPU where CUDA is present, else gloo on CPU. Returns this rank's device."""
    _single_process_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def init_parallel(tp: int, pp: int, seed: int, ep: int = 1) -> ParallelContext:
    """Join the world (torchrun env or a world of one), build the tp/pp/dp groups, seed every RNG."""
    if not torch.cuda.is_available():
        cpu_compat.apply()  # before megatron-core's first import: it quiets warnings printed at import
    from megatron.core import parallel_state, tensor_parallel

    device = join_world()
    dims = ParallelDims.from_world(dist.get_world_size(), tp, pp, ep)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()  # a new layout in the same world (tests, resharding)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelContext(
        dims=dims,
        rank=dist.get_rank(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        mp_group=parallel_state.get_model_parallel_group(),
        device=device,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
    )


def shutdown() -> None:
    """Tear the groups down so a process can exit cleanly (or build a new layout, in tests)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
