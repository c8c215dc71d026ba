"""The DeepSpeed config dicts of a campaign: the student's training engine and the frozen teacher's.

Only `distill/engine/zero/engine.py` reads these. Batch sizes, precision and clipping come from `training`
(the same keys the megatron engine reads), ZeRO's own knobs from the `deepspeed` section. Two choices
are ours, not DeepSpeed's defaults:

- `managed_gradient_accumulation: false`: the engine owns the step boundary (one `step()` per
  optimizer step after all of the step's micro-batches), so the loop's micro-batch count is the only
  one, and the loss scaling is explicit (`ZeroEngine.forward_backward`).
- the optimizer is torch's AdamW handed in by the engine (`zero_allow_untested_optimizer`), the same
  update as the megatron engine's, on CPU and GPU; DeepSpeed's CPU-Adam kernel is not required for
  optimizer offload (`zero_force_ds_cpu_optimizer: false`).
"""

from __future__ import annotations

from typing import Any

import torch

from distill.config import CampaignConfig
from distill.config.zero import ZeroConfig
from distill.errors import DataError

QUIET = {"steps_per_print": 2**62, "wall_clock_breakdown": False}


def zero_section(config: CampaignConfig) -> ZeroConfig:
    """The `deepspeed` section, or its defaults when the config has none."""
    return config.deepspeed or ZeroConfig()


def _zero_block(zero: ZeroConfig, stage: int) -> dict[str, Any]:
    block: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": zero.reduce_bucket_size,
    }
    if zero.offload_optimizer.device != "none":
        block["offload_optimizer"] = zero.offload_optimizer.to_deepspeed()
    if stage == 3:
        block.update(
            stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
            stage3_max_live_parameters=zero.stage3_max_live_parameters,
            stage3_gather_16bit_weights_on_model_save=True,
        )
        if zero.offload_param.device != "none":
            block["offload_param"] = zero.offload_param.to_deepspeed()
    else:
        block["allgather_bucket_size"] = zero.allgather_bucket_size
    return block


def training_config(config: CampaignConfig, dp_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """The student engine's DeepSpeed config for a world of `dp_size` ranks."""
    training = config.training
    assert training is not None
    per_pass = training.micro_batch * dp_size
    if training.global_batch % per_pass:
        raise DataError(
            f"training.global_batch {training.global_batch} is not a multiple of training.micro_batch "
            f"{training.micro_batch} x {dp_size} data-parallel ranks"
        )
    zero = zero_section(config)
    return {
        "train_batch_size": training.global_batch,
        "train_micro_batch_size_per_gpu": training.micro_batch,
        "gradient_accumulation_steps": training.global_batch // per_pass,
        "managed_gradient_accumulation": False,
        "gradient_clipping": training.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        # bf16 weights, fp32 gradients: accumulated and reduced in fp32 like the megatron engine's buffers
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "zero_optimization": _zero_block(zero, zero.zero_stage),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        **QUIET,
    }


def inference_config(config: CampaignConfig, micro_batch: int, dtype: torch.dtype) -> dict[str, Any]:
    """A frozen model (the online teacher) under ZeRO-3 partitioning: no optimizer, no gradients."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": _zero_block(zero_section(config), 3),
        **QUIET,
    }
