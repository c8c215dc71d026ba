"""Loading an HF causal LM as this rank's shard under transformers' tensor parallelism.

`transformers` shards the model by its own tensor-parallel plan (`base_model_tp_plan`: attention and MLP
projections colwise/rowwise, the output layer colwise) while it reads the safetensors, so a rank
materialises its shard only. Its mesh covers the whole world: `DistributedConfig(tp_size=tp,
dp_replicate_size=world / tp)`, tensor-parallel groups of consecutive ranks (megatron-core's order too,
so an online teacher's groups are the student's). At tp 1 every rank loads its own whole copy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from distill.errors import DataError


def load_tensor_parallel(
    directory: Path, *, tp: int, dtype: torch.dtype, device: torch.device, key: str
) -> torch.nn.Module:
    """The model at `directory` (an HF directory) as this rank's tp shard, eval mode, no gradients."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % tp:
        raise DataError(f"{key}: tp {tp} does not divide the {world} ranks of the job")
    options: dict = {"dtype": dtype, "local_files_only": True}
    if tp > 1:
        from transformers.distributed import DistributedConfig

        options["distributed_config"] = DistributedConfig(tp_size=tp, dp_replicate_size=world // tp)
    else:
        options["device_map"] = {"": device}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' notices about its own API moves
            model = AutoModelForCausalLM.from_pretrained(str(directory), **options)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        if tp > 1 and "plan" in str(exc).lower():  # no tp (or fsdp) plan for this model class
            raise DataError(
                f"{key}: tp {tp}, but transformers cannot shard {directory} with its parallel plans ({exc}); "
                "use tp 1, or teacher.engine deepspeed (ZeRO-3)"
            ) from None
        raise DataError(f"{directory} does not load with AutoModelForCausalLM: {exc}") from None
    model.requires_grad_(False)
    return model.eval()
