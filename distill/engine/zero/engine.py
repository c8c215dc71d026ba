"""The DeepSpeed ZeRO engine: a Hugging Face causal LM as it is, sharded by ZeRO 1/2/3 over data
parallel (see `base.py` for the seam; `engine: deepspeed` selects it).

The student is an `AutoModelForCausalLM` loaded from its HF directory (`student.init`, or the random
student `student.arch` writes, the same file the megatron engine starts from), wrapped in
`_OutputLayerToLoss` and handed to `deepspeed.initialize` with torch's AdamW. The wrapper runs the
model's backbone to its final hidden states and gives them, with the output layer's weight, to the
loop's loss callback: the fused chunked loss applies the output layer itself, so no `[tokens, V]`
logits tensor exists here either. Under ZeRO-3 that weight is partitioned and used outside the module
that owns it, so it is registered as an external parameter of the wrapper
(`zero.register_external_parameter`): DeepSpeed gathers it for the wrapper's forward and backward and
its gradient reaches the partitioned copy.

Gradients are of the token-mean over the global batch, as in the megatron engine: each micro-batch's
loss sum is scaled by `dp / global tokens` (DeepSpeed averages gradients over data parallel) and the
engine owns the step boundary (`managed_gradient_accumulation: false`, `zero_config.py`).
The online teacher is a second DeepSpeed engine under ZeRO-3 without optimizer; its output weight is
gathered once (it never changes) so the live signal stays valid until the teacher's next forward.
Checkpoints: `zero_checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distill.config import CampaignConfig
from distill.engine.base import LossFn, OutputFn
from distill.engine.collectives import WorldCollectives
from distill.engine.hf.forward import check_output_layer
from distill.engine.schedule import adamw_param_groups, lr_at
from distill.engine.zero.checkpoint import load_zero_checkpoint, save_zero_checkpoint
from distill.engine.zero.config import inference_config, training_config, zero_section
from distill.errors import DataError
from distill.messages import say
from distill.models.hf_arch import HFArch
from distill.models.student import student_init_path
from distill.models.teacher import open_teacher
from distill.models.weights import Weights, find_weights
from parallel.distributed import join_world
from parallel.model import ModelArch, precision_dtype
from parallel.vocab import VocabShard


class _OutputLayerToLoss(torch.nn.Module):
    """A causal LM whose forward stops at the final hidden states and calls `fn(index, hidden [b, s, h],
    weight [V, h], labels [b, s])` with the output layer's weight (the loss applies the layer)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.fn: OutputFn | None = None
        self.weight: torch.Tensor | None = None  # a frozen model's gathered output weight (else the live one)

    def forward(self, index: int, tokens: torch.Tensor) -> Any:
        assert self.fn is not None
        inputs, labels = tokens[:, :-1], tokens[:, 1:]  # [b, s] each
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=inputs, use_cache=False).last_hidden_state  # [b, s, h]
        weight = self.weight if self.weight is not None else self.model.get_output_embeddings().weight
        return self.fn(index, hidden, weight, labels)


def _hf_weights(weights: Weights, key: str) -> Path:
    if weights.kind != "hf":
        raise DataError(
            f"{key} {weights.directory} is a megatron checkpoint; engine deepspeed loads Hugging Face "
            f"directories (or its own checkpoints): run `distillery export {weights.directory} <dir>` and "
            f"point {key} there"
        )
    return weights.directory


def _load_hf(directory: Path, ds_config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """`from_pretrained` with DeepSpeed's config announced, so under ZeRO-3 transformers builds the
    model inside `zero.Init` and each rank materialises only its partition."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    announced = HfDeepSpeedConfig(ds_config)  # noqa: F841 (read through a weak reference while loading)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{directory} does not load with AutoModelForCausalLM: {exc}") from None


def _initialize(wrapper: _OutputLayerToLoss, ds_config: dict[str, Any], optimizer: Any = None) -> Any:
    import deepspeed

    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=ds_config)
    if ds_config["zero_optimization"]["stage"] == 3 and wrapper.weight is None:
        deepspeed.zero.register_external_parameter(wrapper, wrapper.model.get_output_embeddings().weight)
    return engine


class ZeroForward:
    """Forward-only passes of a DeepSpeed-wrapped causal LM (evaluation, the frozen online teacher)."""

    def __init__(
        self,
        engine: Any,
        wrapper: _OutputLayerToLoss,
        arch: ModelArch | HFArch,
        device: torch.device,
    ) -> None:
        self.ds, self.wrapper, self.arch, self.device = engine, wrapper, arch, device
        self.num_parameters, self.vocab_size = arch.num_parameters(), arch.vocab_size
        self.shard = VocabShard(0, arch.vocab_size, None)  # ZeRO never splits the vocabulary

    def forward(self, micro_batches: Sequence[torch.Tensor], fn: OutputFn) -> list[Any]:
        was_training = self.ds.training
        self.ds.eval()
        self.wrapper.fn = fn
        try:
            with torch.no_grad():
                return [self.ds(i, tokens.to(self.device)) for i, tokens in enumerate(micro_batches)]
        finally:
            self.ds.train(was_training)
            self.wrapper.fn = None


class ZeroEngine(WorldCollectives, ZeroForward):
    def __init__(self, config: CampaignConfig) -> None:
        assert config.training is not None and config.checkpoint is not None
        self.config = config
        device = join_world()
        try:
            self._build(config, device)
        except BaseException:
            self.close()
            raise

    def _build(self, config: CampaignConfig, device: torch.device) -> None:
        assert config.training is not None
        start_deepspeed(device)
        torch.manual_seed(config.training.seed)
        self.rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.world_size = self.dp_size
        self.dp_rank, self.is_main = self.rank, self.rank == 0
        self.weights = find_weights(
            student_init_path(config, is_main=self.is_main, broadcast_from_main=self.broadcast_from_main)
        )
        arch = self.weights.megatron_arch("student.init")  # a student's checkpoints record its ModelArch
        self.tokenizer_dir = self.weights.tokenizer_dir
        self.dtype = precision_dtype(config.training.precision)
        self.ds_config = training_config(config, self.dp_size, self.dtype)
        self.stage = zero_section(config).zero_stage
        model = _load_hf(_hf_weights(self.weights, "student.init"), self.ds_config, self.dtype)
        wrapper = _OutputLayerToLoss(model)
        optimizer = torch.optim.AdamW(
            adamw_param_groups(model.named_parameters(), config.training),
            lr=config.training.lr,
            betas=config.training.betas,
            eps=config.training.eps,
        )
        super().__init__(_initialize(wrapper, self.ds_config, optimizer), wrapper, arch, device)
        self.loss_rank = self.counting_rank = True  # every rank holds whole layers and its own batch slice
        self.description = f"{arch.num_parameters() / 1e6:.1f}M parameters, DeepSpeed ZeRO-{self.stage} x {self.dp_size} ranks"

    def resume(self) -> dict[str, Any] | None:
        assert self.config.checkpoint is not None
        state = load_zero_checkpoint(
            self.ds, self.config.checkpoint.dir, rank=self.rank, dp_size=self.dp_size, stage=self.stage
        )
        if state is not None:
            say("train", f"resumed from {state['checkpoint']} at step {state['step']}")
            return state
        say("train", f"starting from {self.weights.directory} ({self.description})")
        return None

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], loss: LossFn) -> list[dict[str, Any]]:
        tokens = sum(m.shape[0] * (m.shape[1] - 1) for m in micro_batches)
        local = torch.tensor(tokens, dtype=torch.float64, device=self.device)  # NCCL: on the device
        dist.all_reduce(local)  # tokens in the global batch
        scale = self.dp_size / local.item()  # DeepSpeed averages over data parallel: d(sum / tokens)
        self.wrapper.fn = loss
        reports = []
        try:
            for index, tokens in enumerate(micro_batches):
                loss_sum, _, report = self.ds(index, tokens.to(self.device))
                self.ds.backward(loss_sum * scale, scale_wrt_gas=False)
                reports.append(report)
        finally:
            self.wrapper.fn = None
        return reports

    def optimizer_step(self, step: int) -> tuple[float, float]:
        assert self.config.training is not None
        lr = lr_at(step, self.config.training)
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()  # reduce (stage 1) / finish partitioned gradients, clip, update
        return float(self.ds.get_global_grad_norm()), lr

    def save(self, step: int, training_state: dict[str, Any]) -> Path:
        assert self.config.checkpoint is not None
        return save_zero_checkpoint(
            self.ds,
            self.config.checkpoint,
            step,
            training_state=training_state,
            arch=self.arch,
            source=self.config.run.name,
            tokenizer_dir=self.tokenizer_dir,
            rank=self.rank,
            dp_size=self.dp_size,
            stage=self.stage,
        )

    def frozen_model(
        self, path: Path, *, precision: str, tokenizer_sha256: str, data_dir: Path
    ) -> ZeroForward:
        assert self.config.training is not None
        return frozen_zero_model(
            self.config,
            path,
            micro_batch=self.config.training.micro_batch,
            precision=precision,
            tokenizer_sha256=tokenizer_sha256,
            data_dir=data_dir,
            device=self.device,
        )

    def close(self) -> None:
        leave_deepspeed()


def start_deepspeed(device: torch.device) -> None:
    """DeepSpeed's view of the world this process joined (quietly: its notices are not the user's)."""
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # said, not guessed (and not warned about)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19.8 calls torch's deprecated collective aliases; nothing a user can act on
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    with contextlib.redirect_stdout(io.StringIO()):  # "DeepSpeed ... shm_comm_op built successfully"
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)


def leave_deepspeed() -> None:
    """Leave the world through DeepSpeed when it was joined, so its cached groups go too."""
    if "deepspeed" in sys.modules and dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()


def frozen_zero_model(
    config: CampaignConfig,
    path: Path,
    *,
    micro_batch: int,
    precision: str,
    tokenizer_sha256: str,
    data_dir: Path,
    device: torch.device,
) -> ZeroForward:
    """The teacher at `path` (any HF causal LM) partitioned by ZeRO-3 over the world, forward-only: the
    online teacher of a ZeRO student, and the cache stage's under teacher.engine deepspeed."""
    import deepspeed

    weights = open_teacher(path, tokenizer_sha256=tokenizer_sha256, data_dir=data_dir)
    dtype = precision_dtype(precision)
    ds_config = inference_config(config, micro_batch, dtype)
    model = _load_hf(_hf_weights(weights, "teacher.path"), ds_config, dtype).eval()
    model.requires_grad_(False)
    wrapper = _OutputLayerToLoss(model)
    weight = model.get_output_embeddings().weight
    with deepspeed.zero.GatheredParameters([weight], enabled=hasattr(weight, "ds_id")):
        wrapper.weight = weight.detach().clone()  # [V, h]: kept whole, read after each forward
    forward = ZeroForward(_initialize(wrapper, ds_config), wrapper, weights.arch, device)
    check_output_layer(model, wrapper.weight, forward.shard, weights.arch.model_type, device)
    return forward
