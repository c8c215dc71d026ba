"""What a step costs: model FLOPs, MFU, the step-time split, peak memory.

**Model FLOPs per token** (PaLM, appendix B; what Megatron-LM and torchtitan report): a matmul with
`P` weights costs `2P` FLOPs per token forward and `4P` backward, so `6N` for a training step, where
`N` counts the weights that multiply activations: every linear layer and the output layer (the input
embedding is a lookup and is not counted; with tied embeddings the shared matrix is counted once, as
the output layer). Attention scores and their weighted sum add `2 * 2 * s * h` per layer and token
forward (`s` the sequence length, `h` the hidden size; the causal mask's half is not subtracted, as in
PaLM), so a training step costs `6N + 12 L s h` per token and a forward-only pass `2N + 4 L s h`.
An online teacher's forward pass is model FLOPs of the step too.

**MFU** = model FLOPs per second per device / the device's peak dense bf16 FLOP/s: from
`training.peak_tflops`, else from the GPU table (`distill/gpus.py`) by the CUDA device's name. On CPU there is no peak
(none is known for a CPU's matmul throughput); the achieved TFLOP/s per device is logged and MFU is
not, and metrics say `device: cpu`.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from distill.gpus import find_gpu

if TYPE_CHECKING:
    from parallel.model import ModelArch


def matmul_parameters(arch: ModelArch) -> int:
    """Weights that multiply activations: all but the input embedding (and the norms' scales)."""
    norms = arch.num_layers * 2 * arch.hidden_size + arch.hidden_size
    input_embedding = 0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size
    return arch.num_parameters() - input_embedding - norms


def flops_per_token(arch: ModelArch, seq_len: int, *, backward: bool) -> float:
    """Model FLOPs per token of a training step (`backward`) or a forward-only pass."""
    forward = 2 * matmul_parameters(arch) + 4 * arch.num_layers * seq_len * arch.hidden_size
    return 3.0 * forward if backward else float(forward)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """The peak of one device: configured, else looked up by the CUDA device name, else None."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    gpu = find_gpu(torch.cuda.get_device_name(device))
    return gpu.bf16_tflops if gpu is not None else None


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """This process's peak host RSS, and the CUDA allocator's peak on GPU, in GiB."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss = rss_kib / 2**30 if sys.platform == "darwin" else rss_kib / 2**20
    out = {"memory/host_peak_gib": rss}
    if device.type == "cuda":
        out["memory/cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


class StepTimer:
    """Wall time of a step's phases. On CUDA each phase ends with a synchronize, so asynchronous
    kernels are charged to the phase that launched them (the cost: the phases no longer overlap)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def start(self) -> None:
        self.seconds.clear()
        self._sync()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The time since the previous mark (or `start`) was spent in `phase`."""
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
