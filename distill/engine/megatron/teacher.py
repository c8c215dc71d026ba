"""The cache stage's job under megatron-core: a teacher on its own layout (`teacher.parallel`).

The teacher's tp x pp x dp is independent of any student's. The job joins the world with that layout,
says which ranks receive the forward callbacks (the last pipeline stage) and which one of them writes
(tensor-parallel rank 0), and builds the frozen teacher through the same `frozen_model` as the online
teacher (`forward.py`).
"""

from __future__ import annotations

from pathlib import Path

from distill.config.train import ParallelConfig
from distill.engine.collectives import WorldCollectives
from distill.engine.megatron.forward import MegatronForward, frozen_model
from parallel.distributed import ParallelContext, init_parallel, shutdown


class MegatronTeacherJob(WorldCollectives):
    engine = "megatron"  # teacher.engine

    def __init__(self, layout: ParallelConfig, ctx: ParallelContext | None = None) -> None:
        self.joined = ctx is None  # this job joined the world (and leaves it on close)
        self.ctx = ctx or init_parallel(layout.tp, layout.pp, seed=0, ep=layout.ep)
        self.device = self.ctx.device
        self.dp_rank, self.dp_size = self.ctx.dp_rank, self.ctx.dims.dp
        self.is_main = self.ctx.is_main
        self.loss_rank = self.ctx.is_last_stage
        self.counting_rank = self.ctx.is_last_stage and self.ctx.tp_rank == 0
        self.lockstep = (
            self.ctx.dims.ep > 1
        )  # every forward is collective across replicas (expert parallelism)
        self.description = str(self.ctx.dims)

    def frozen_model(
        self, path: Path, *, precision: str, tokenizer_sha256: str, data_dir: Path
    ) -> MegatronForward:
        return frozen_model(
            path, self.ctx, precision=precision, tokenizer_sha256=tokenizer_sha256, data_dir=data_dir
        )

    def close(self) -> None:
        if self.joined:
            shutdown()
