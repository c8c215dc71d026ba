"""The `deepspeed` section: how the DeepSpeed engine (`engine: deepspeed`) shards the student.

These keys map one to one onto DeepSpeed's `zero_optimization` block (`distill/engine/zero/config.py`
writes it); the batch sizes, precision, clipping and optimizer come from `training`, so a campaign
switches engines by changing `engine` alone. Offloading is passed through after checks DeepSpeed
itself only makes deep inside `initialize` (or not at all): parameters offload only under stage 3,
NVMe needs a path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill.config.base import AbsPath, Section


class OffloadConfig(Section):
    """Where optimizer state (or, stage 3, parameters) lives between uses."""

    device: Literal["none", "cpu", "nvme"] = "none"
    pin_memory: bool = Field(default=False, description="Page-locked host buffers (faster copies to GPU).")
    nvme_path: AbsPath | None = Field(
        default=None, description="Directory on a fast local disk (device nvme)."
    )

    @model_validator(mode="after")
    def _nvme_has_path(self) -> OffloadConfig:
        if self.device == "nvme" and self.nvme_path is None:
            raise ValueError("device nvme needs nvme_path (a directory on a fast local disk)")
        if self.device != "nvme" and self.nvme_path is not None:
            raise ValueError(f"nvme_path is only read with device nvme (device is {self.device!r})")
        return self

    def to_deepspeed(self) -> dict[str, object]:
        block: dict[str, object] = {"device": self.device, "pin_memory": self.pin_memory}
        if self.nvme_path is not None:
            block["nvme_path"] = str(self.nvme_path)
        return block


class ZeroConfig(Section):
    """DeepSpeed ZeRO: stage 1 shards optimizer state over data-parallel ranks, 2 also gradients, 3 also
    parameters (gathered layer by layer as the forward and backward passes reach them)."""

    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: OffloadConfig = OffloadConfig()
    offload_param: OffloadConfig = Field(default=OffloadConfig(), description="Stage 3 only.")
    overlap_comm: bool = Field(default=False, description="Overlap gradient reduction with backward (GPU).")
    reduce_bucket_size: int = Field(default=500_000_000, gt=0, description="Elements per gradient reduction.")
    allgather_bucket_size: int = Field(
        default=500_000_000, gt=0, description="Stages 1-2: elements per gather."
    )
    stage3_prefetch_bucket_size: int = Field(default=50_000_000, ge=0)
    stage3_param_persistence_threshold: int = Field(
        default=100_000, ge=0, description="Stage 3: parameters this small stay whole on every rank."
    )
    stage3_max_live_parameters: int = Field(default=1_000_000_000, gt=0)

    @model_validator(mode="after")
    def _what_each_stage_supports(self) -> ZeroConfig:
        """What DeepSpeed would refuse deep inside `initialize`, or quietly do otherwise."""
        if self.offload_param.device != "none" and self.zero_stage != 3:
            raise ValueError(
                f"offload_param needs zero_stage 3 (only stage 3 partitions parameters; zero_stage is {self.zero_stage})"
            )
        if self.offload_optimizer.device == "nvme" and self.zero_stage != 3:
            raise ValueError(
                f"offload_optimizer device nvme needs zero_stage 3 (stages 1-2 would keep the state in host "
                f"memory and ignore nvme_path; zero_stage is {self.zero_stage}); use device cpu"
            )
        if self.overlap_comm and self.zero_stage == 1:
            raise ValueError(
                "overlap_comm needs zero_stage 2 or 3 (DeepSpeed overlaps gradient reduction there)"
            )
        return self
