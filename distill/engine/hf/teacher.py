"""The cache stage's job under transformers: any HF causal LM as a teacher, tensor-parallel.

`teacher.engine: transformers` (what `auto` picks for a model megatron-core has no mapping for): the
world is split into data-parallel replicas of `teacher.parallel.tp` consecutive ranks; each replica
runs the teacher sharded by transformers' own tensor-parallel plan, every rank of it receives the
callbacks (the output layer's vocabulary slice is its own) and its tp rank 0 writes. `tensor_parallel_teacher`
is also how a megatron student's online teacher of such a type is built, over the student's tp groups.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from distill.config.train import ParallelConfig
from distill.engine.collectives import WorldCollectives
from distill.engine.hf.forward import HFForward
from distill.engine.hf.load import load_tensor_parallel
from distill.errors import DataError
from distill.models.teacher import open_teacher
from parallel.distributed import join_world
from parallel.model import precision_dtype


def tensor_parallel_teacher(
    path: Path, *, tp: int, precision: str, tokenizer_sha256: str, data_dir: Path, device: torch.device
) -> HFForward:
    """The teacher at `path` (checked to share the data's tokenizer), this rank's tp shard of it."""
    weights = open_teacher(path, tokenizer_sha256=tokenizer_sha256, data_dir=data_dir)
    if weights.kind != "hf":
        raise DataError(
            f"teacher.path {path} is a distillery checkpoint; the transformers path loads Hugging Face "
            f"directories: `distillery export` it, or use teacher.engine megatron"
        )
    model = load_tensor_parallel(
        weights.directory, tp=tp, dtype=precision_dtype(precision), device=device, key="teacher.parallel.tp"
    )
    return HFForward(model, weights.arch, device)


class TransformersTeacherJob(WorldCollectives):
    engine = "transformers"  # teacher.engine

    def __init__(self, layout: ParallelConfig) -> None:
        if layout.pp != 1:
            raise DataError(
                f"teacher.parallel.pp is {layout.pp}: teacher.engine transformers has no pipeline (pp 1)"
            )
        self.joined = not dist.is_initialized()  # this job joined the world (and leaves it on close)
        self.device = join_world()
        rank, world = dist.get_rank(), dist.get_world_size()
        if world % layout.tp:
            raise DataError(f"teacher.parallel.tp {layout.tp} does not divide the {world} ranks of the job")
        self.tp = layout.tp
        self.dp_rank, self.dp_size, self.is_main = rank // self.tp, world // self.tp, rank == 0
        self.loss_rank = True
        self.counting_rank = rank % self.tp == 0
        self.lockstep = False  # every forward is collective across replicas (expert parallelism)
        self.description = f"tp {self.tp} x dp {self.dp_size} (transformers tensor parallelism)"

    def frozen_model(self, path: Path, *, precision: str, tokenizer_sha256: str, data_dir: Path) -> HFForward:
        return tensor_parallel_teacher(
            path,
            tp=self.tp,
            precision=precision,
            tokenizer_sha256=tokenizer_sha256,
            data_dir=data_dir,
            device=self.device,
        )

    def close(self) -> None:
        if self.joined and dist.is_initialized():
            dist.destroy_process_group()
