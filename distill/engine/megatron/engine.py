"""The megatron-core engine: the student as a GPTModel under TP x PP x DP (see `base.py` for the seam).

Built once per process: joins the world and builds megatron-core's groups (`init_parallel`), builds
this rank's stage of the student, wraps it in megatron-core DDP (fp32 grad buffers; gradients of the
token-mean over the global batch via `calculate_per_token_loss`) and our AdamW (megatron-core's
optimizers need CUDA tensors). The last stage emits final hidden states, and every loss callback gets
them with the output layer's weight slice, so the fused loss applies the output layer chunk by chunk.
Passes go through `parallel.schedule` (1F1B across pipeline stages); checkpoints through
`distill.checkpoint` (`dist_checkpointing`, loadable at any layout); weights through `load_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distill.checkpoint import latest_checkpoint
from distill.config import CampaignConfig
from distill.engine.base import ForwardModel, LossFn
from distill.engine.collectives import WorldCollectives
from distill.engine.megatron.checkpoint import load_checkpoint, save_checkpoint
from distill.engine.megatron.distributed_optimizer import MegatronDistributedOptimizer
from distill.engine.megatron.forward import MegatronForward, frozen_model
from distill.engine.megatron.optimizer import DistillOptimizer
from distill.engine.megatron.weights import load_weights
from distill.errors import DataError
from distill.messages import say
from distill.models.student import student_init_path
from distill.models.weights import checkpoint_meta, find_weights
from parallel.distributed import ParallelContext, init_parallel, shutdown
from parallel.model import emit_hidden_states, output_weight, precision_dtype
from parallel.schedule import forward_backward
from parallel.vocab import VocabShard


class MegatronEngine(WorldCollectives, MegatronForward):
    def __init__(self, config: CampaignConfig, ctx: ParallelContext | None = None) -> None:
        assert config.training is not None and config.checkpoint is not None
        self.config = config
        self.ctx = ctx or init_parallel(config.parallel.tp, config.parallel.pp, seed=config.training.seed)
        try:
            self._build(config, self.ctx)
        except BaseException:
            if ctx is None:  # this engine joined the world: leave it, so the process can exit
                shutdown()
            raise

    def _build(self, config: CampaignConfig, ctx: ParallelContext) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        from parallel.model import build_gpt

        assert config.training is not None
        ctx.dims.global_batch_split(
            config.training.global_batch, config.training.micro_batch
        )  # checks it tiles
        self.weights = find_weights(
            student_init_path(config, is_main=ctx.is_main, broadcast_from_main=self.broadcast_from_main)
        )
        arch = self.weights.megatron_arch("student.init")
        self.arch, self.tokenizer_dir = arch, self.weights.tokenizer_dir
        model = build_gpt(
            arch, ctx.dims, pp_rank=ctx.pp_rank, dtype=precision_dtype(config.training.precision)
        )
        model.config.calculate_per_token_loss = True  # gradients of the token-mean over the global batch
        ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=config.training.distributed_optimizer,
            ),
            module=model,
        )
        model.config.no_sync_func = ddp.no_sync
        model.config.finalize_model_grads_func = finalize_model_grads
        self.ddp = ddp
        self.optimizer: DistillOptimizer | MegatronDistributedOptimizer = (
            MegatronDistributedOptimizer(ddp, config.training, precision_dtype(config.training.precision))
            if config.training.distributed_optimizer
            else DistillOptimizer(model, config.training, mp_group=ctx.mp_group, tp_rank=ctx.tp_rank)
        )
        emit_hidden_states(model)  # the last stage hands hidden states to the fused loss
        shard = VocabShard.of(arch.vocab_size, ctx.tp_rank, ctx.dims.tp, ctx.tp_group)
        super().__init__(ddp, model, arch, shard)
        self.device = ctx.device
        self.dp_rank, self.dp_size, self.world_size = ctx.dp_rank, ctx.dims.dp, ctx.dims.world_size
        self.is_main = ctx.is_main
        self.loss_rank = ctx.is_last_stage
        self.counting_rank = ctx.is_last_stage and ctx.tp_rank == 0
        self.description = f"{arch.num_parameters() / 1e6:.1f}M parameters, {ctx.dims}"

    def resume(self) -> dict[str, Any] | None:
        assert self.config.checkpoint is not None
        latest = latest_checkpoint(self.config.checkpoint.dir)
        if latest is not None:
            loaded = load_checkpoint(latest, model=self.module, optimizer=self.optimizer, ctx=self.ctx)
            say("train", f"resumed from {latest} at step {loaded['training_state']['step']}")
            return {**loaded["training_state"], "checkpoint": str(latest)}
        load_weights(self.module, self.weights, self.ctx)
        self.optimizer.reload_model_params()  # bf16: the fp32 masters were made before the weights came
        say("train", f"starting from {self.weights.directory} ({self.description})")
        return None

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], loss: LossFn) -> list[dict[str, Any]]:
        def on_output(index: int, hidden: torch.Tensor, labels: torch.Tensor) -> Any:
            return loss(index, hidden, output_weight(self.module), labels)

        self.ddp.zero_grad_buffer()
        return forward_backward(self.ddp, micro_batches, on_output, seq_length=micro_batches[0].shape[1] - 1)

    def optimizer_step(self, step: int) -> tuple[float, float]:
        return self.optimizer.step(step)

    def save(self, step: int, training_state: dict[str, Any]) -> Path:
        assert self.config.checkpoint is not None
        return save_checkpoint(
            self.config.checkpoint.dir,
            step,
            model=self.module,
            optimizer=self.optimizer,
            training_state=training_state,
            meta=checkpoint_meta(self.arch, self.config.run.name),
            ctx=self.ctx,
            tokenizer_dir=self.tokenizer_dir,
            keep_last=self.config.checkpoint.keep_last,
        )

    def frozen_model(
        self, path: Path, *, precision: str, tokenizer_sha256: str, data_dir: Path
    ) -> ForwardModel:
        """The online teacher over the student's layout: megatron-core when it maps the teacher's type;
        else the HF module under transformers' tensor parallelism over the student's tp groups (which
        split its vocabulary as the student's), at pp 1."""
        if find_weights(path).megatron_ready:
            return frozen_model(
                path, self.ctx, precision=precision, tokenizer_sha256=tokenizer_sha256, data_dir=data_dir
            )
        if self.ctx.dims.pp > 1:
            raise DataError(
                f"teacher.path {path}: an online teacher that megatron-core does not map runs as a Hugging "
                f"Face module with tensor parallelism only, and parallel.pp is {self.ctx.dims.pp}: train at pp 1, "
                "or cache the teacher (teacher.mode: cached)"
            )
        from distill.engine.hf.teacher import tensor_parallel_teacher

        teacher = tensor_parallel_teacher(
            path,
            tp=self.ctx.dims.tp,
            precision=precision,
            tokenizer_sha256=tokenizer_sha256,
            data_dir=data_dir,
            device=self.device,
        )
        split = VocabShard.of(teacher.vocab_size, self.ctx.tp_rank, self.ctx.dims.tp, self.ctx.tp_group)
        if (teacher.shard.start, teacher.shard.size) != (split.start, split.size):
            raise DataError(
                f"teacher.path {path}: its vocabulary of {teacher.vocab_size} does not split evenly over "
                f"parallel.tp {self.ctx.dims.tp} as the losses split it; choose a tp that divides it"
            )
        return teacher

    def close(self) -> None:
        shutdown()
