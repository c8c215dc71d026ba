"""What a training step reports: its result, its cost in model FLOPs and MFU, its metrics record and line.

`StepResult` is one step as the loop took it. `StepLog` knows what a step costs (the student's
training FLOPs plus a live teacher's forward, over the global batch; `throughput.py` has the formulas)
and what the job runs on (the engine's world size and device), gives those facts for the loop to log at
step 0 (`run_facts`), and turns each logged step into a metrics record (loss terms, lr, grad norm, tokens/s, the step-time split, TFLOP/s per
device, MFU where the device's peak is known, peak memory) and one console line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distill.config import CampaignConfig
from distill.data.mixture import Row
from distill.engine.base import Engine
from distill.messages import say
from distill.metrics import MetricsLogger
from distill.training.throughput import device_label, flops_per_token, peak_memory_gib, peak_tflops

if TYPE_CHECKING:  # an annotation: the loop stays free of model-building code
    from parallel.model import ModelArch


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    terms: dict[str, float]  # token-mean of each loss term (unweighted)
    tau: float | None = None  # TAID's tau used in this step
    mixture: dict[str, float] | None = None  # DDK's evaluation and new weights, after this step
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the step (StepTimer)
    samples: list[Row] = field(default_factory=list)  # the global batch: (domain, index) of each sequence


class StepLog:
    def __init__(
        self,
        config: CampaignConfig,
        engine: Engine,
        metrics: MetricsLogger,
        *,
        seq_len: int,
        teacher: ModelArch | None,
    ) -> None:
        """`teacher`: the architecture of a teacher that runs in every step (its forward is model FLOPs of
        the step), or None."""
        assert config.training is not None
        self.cfg, self.engine, self.metrics = config.training, engine, metrics
        tokens = self.cfg.global_batch * seq_len
        flops = flops_per_token(engine.arch, seq_len, backward=True)
        if teacher is not None:
            flops += flops_per_token(teacher, seq_len, backward=False)
        self.step_flops = flops * tokens
        self.devices = engine.world_size
        self.peak_tflops = peak_tflops(self.cfg.peak_tflops, engine.device)
        self.tokens_per_step = tokens

    def run_facts(self) -> dict[str, Any]:
        """Logged once at step 0: what the throughput numbers are relative to."""
        return {
            "device": device_label(self.engine.device),
            "devices": self.devices,
            "peak_tflops": self.peak_tflops,
            "model_flops_per_step": self.step_flops,
            "student_parameters": self.engine.num_parameters,
            "tokens_per_step": self.tokens_per_step,
        }

    def tflops_per_device(self, seconds: float) -> float:
        return self.step_flops / seconds / self.devices / 1e12

    def log(self, result: StepResult) -> None:
        achieved = self.tflops_per_device(result.seconds)
        record = {
            "loss": result.loss,
            **{f"loss/{name}": value for name, value in result.terms.items()},
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "tokens_per_s": result.tokens / result.seconds,
            "step_seconds": result.seconds,
            **{f"time/{phase}": seconds for phase, seconds in result.phases.items()},
            "tflops_per_device": achieved,
            **peak_memory_gib(self.engine.device),
        }
        if self.peak_tflops:
            record["mfu"] = achieved / self.peak_tflops
        if result.tau is not None:
            record["taid/tau"] = result.tau
        self.metrics.log(result.step, record)
        terms = " ".join(f"{name} {value:.4f}" for name, value in result.terms.items())
        tau = f" tau {result.tau:.4f}" if result.tau is not None else ""
        say(
            "train",
            f"step {result.step}/{self.cfg.steps} loss {result.loss:.4f} ({terms}){tau} "
            f"grad_norm {result.grad_norm:.3f} lr {result.lr:.2e} {result.tokens / result.seconds:,.0f} tok/s",
        )
