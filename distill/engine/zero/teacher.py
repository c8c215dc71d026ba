"""The cache stage's job under DeepSpeed: any HF causal LM as a teacher partitioned by ZeRO-3.

Every rank holds 1/world of the teacher's weights and runs its own sequences (data parallel): ZeRO-3
gathers each layer's weights for the forward and frees them after, so the teacher fits where its full
weights would not fit one device. The output weight is kept whole on each rank (the vocabulary is not
split; its shard's group is None), so each rank extracts its signal alone. `teacher.engine: deepspeed`.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from distill.config import CampaignConfig
from distill.engine.collectives import WorldCollectives
from distill.engine.zero.engine import ZeroForward, frozen_zero_model, leave_deepspeed, start_deepspeed
from parallel.distributed import join_world


class ZeroTeacherJob(WorldCollectives):
    engine = "deepspeed"  # teacher.engine

    def __init__(self, config: CampaignConfig) -> None:
        assert config.teacher is not None
        self.config = config
        self.joined = not dist.is_initialized()  # this job joined the world (and leaves it on close)
        self.device = join_world()
        start_deepspeed(self.device)
        rank, world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_size, self.is_main = rank, world, rank == 0
        self.loss_rank = self.counting_rank = True  # each rank writes what its own sequences give
        self.lockstep = False  # every forward is collective across replicas (expert parallelism)
        self.description = f"DeepSpeed ZeRO-3 x {world} ranks"

    def frozen_model(
        self, path: Path, *, precision: str, tokenizer_sha256: str, data_dir: Path
    ) -> ZeroForward:
        assert self.config.teacher is not None
        return frozen_zero_model(
            self.config,
            path,
            micro_batch=self.config.teacher.micro_batch,
            precision=precision,
            tokenizer_sha256=tokenizer_sha256,
            data_dir=data_dir,
            device=self.device,
        )

    def close(self) -> None:
        if self.joined:
            leave_deepspeed()
