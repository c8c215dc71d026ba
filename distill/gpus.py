"""The one table of GPUs: memory and dense bf16 peak. `distillery plan` checks layouts against the memory;
the MFU metric (`distill/training/throughput.py`) divides by the peak.

Peaks are the vendors' dense (not sparse) bf16 tensor-core numbers per device, SXM parts unless named;
memory is the device's nominal capacity in GB (10^9 bytes), of which the CUDA context and allocator keep
some for themselves (the plan's headroom).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float  # nominal, 10^9 bytes
    bf16_tflops: float  # dense peak

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


GPUS = {
    gpu.name: gpu
    for gpu in (
        GPU("B200", 180.0, 2250.0),
        GPU("H200", 141.0, 989.0),
        GPU("GH200", 96.0, 989.0),
        GPU("H100 NVL", 94.0, 835.0),
        GPU("H100 PCIe", 80.0, 756.0),
        GPU("H100", 80.0, 989.0),
        GPU("A100 40GB", 40.0, 312.0),
        GPU("A100", 80.0, 312.0),
        GPU("L40S", 48.0, 362.0),
        GPU("A10G", 24.0, 125.0),
        GPU("L4", 24.0, 121.0),
        GPU("V100", 32.0, 125.0),  # fp16: V100 has no bf16
    )
}


def find_gpu(name: str) -> GPU | None:
    """The table's GPU whose name `name` contains (a CUDA device name such as "NVIDIA H100 80GB HBM3", or
    what a user types: "h100"), the longest match first ("H100 PCIe" before "H100"); None if unknown."""
    folded = name.casefold()
    for key in sorted(GPUS, key=len, reverse=True):
        if all(word in folded for word in key.casefold().split()):  # "A100 40GB" in "A100-SXM4-40GB"
            return GPUS[key]
    return None
