"""The seam between the distillation loop and the engine that owns the model and its parallelism.

The loop (`distill/training/loop.py`) is about distillation: the domain mixture and DDK, the objective
and TAID, evaluation and checkpoint cadence, metrics, the training-state dict. An `Engine` is about one
sharded student: building it and loading its weights, forward/backward over a step's micro-batches with
a loss callback, the optimizer step, forward-only passes, save/load, and the output layer the fused
loss applies. Two engines fit this seam:

- megatron-core (`distill/engine/megatron/engine.py`): GPTModel under TP x PP x DP, pipeline schedules.
- DeepSpeed ZeRO over Hugging Face modules: the same calls, with the loss callback invoked on the
  module's final hidden states. Under ZeRO-3 the output weight is partitioned; the engine hands the
  callback a gathered weight (`deepspeed.zero.GatheredParameters` around the callback, with the weight
  registered via `zero.register_external_parameter` on the module that calls the loss), so its
  gradient reaches the partitioned copy. The loop never touches a parameter itself.

A teacher comes from the same seam: `Engine.frozen_model` inside a training job (the online teacher,
sharded like the student) and `TeacherJob.frozen_model` on the teacher's own layout (the cache stage);
`distill.engine.teacher_job` builds the latter for `teacher.engine`: megatron-core, or the teacher as a
Hugging Face module (`distill/engine/hf/`: any causal LM transformers knows) under transformers' tensor
parallelism or DeepSpeed ZeRO-3.

Callbacks see one micro-batch at a time, on the ranks that compute the loss (megatron: the last
pipeline stage, every tp rank), as `fn(index, hidden [b, s, h], weight [V/tp, h], labels [b, s])`.
Passes are collective: every rank of the job calls `forward` / `forward_backward` the same number of
times (held-out evaluation pads replicas with fewer sequences). What a frozen model's callback keeps
(the online teacher's hidden states and output weight, read later by the student's loss) must stay
valid until that model's next `forward`: a ZeRO-3 engine keeps its teacher's output weight gathered
for the step (or out of partitioning), since a frozen weight never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from parallel.vocab import VocabShard

if TYPE_CHECKING:  # an annotation: the loop stays free of model-building code
    from distill.models.hf_arch import HFArch
    from parallel.model import ModelArch

# (index of the micro-batch, hidden [b, s, h], output weight [V/tp, h], labels [b, s]) -> result
OutputFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Any]
# a training loss: the same arguments -> (loss_sum, num_tokens, report of per-micro-batch sums)
LossFn = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, Any]]
]


class ForwardModel(Protocol):
    """A sharded model run forward-only (the student in evaluation, a frozen online teacher)."""

    arch: ModelArch | HFArch  # what it computes (model FLOPs per token for MFU)
    vocab_size: int
    num_parameters: int
    shard: VocabShard  # the slice of its output vocabulary each callback's weight holds, and its group

    def forward(self, micro_batches: Sequence[torch.Tensor], fn: OutputFn) -> list[Any]:
        """Run `micro_batches` (`[b, s + 1]` tokens each); `fn`'s result per micro-batch on loss ranks,
        None elsewhere."""
        ...


class Engine(ForwardModel, Protocol):
    """The student, sharded, with its optimizer and checkpoints."""

    tokenizer_dir: Path  # the student's tokenizer (checked against the prepared data by the loop)
    device: torch.device
    dp_rank: int  # which data-parallel replica this rank belongs to, of `dp_size`
    dp_size: int
    world_size: int  # every rank of the job (megatron: tp x pp x dp; ZeRO: dp): the devices a step runs on
    is_main: bool  # the one process that writes shared files and prints
    loss_rank: bool  # this rank runs loss callbacks (and needs the teacher signal)
    counting_rank: bool  # this rank's loss reports are summed into the global metrics (each counted once)

    def resume(self) -> dict[str, Any] | None:
        """Load the run's latest checkpoint if there is one and return its training state, else load
        the initial weights and return None (collective)."""
        ...

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], loss: LossFn) -> list[dict[str, Any]]:
        """Zero the gradients, run forward and backward over the step's equal-size micro-batches;
        gradients are of the token-mean loss over the global batch. Reports on loss ranks."""
        ...

    def optimizer_step(self, step: int) -> tuple[float, float]:
        """Reduce gradients, clip, step with the learning rate of optimizer step `step` (0-based);
        returns (grad norm, lr)."""
        ...

    def save(self, step: int, training_state: dict[str, Any]) -> Path:
        """Collective, atomic checkpoint of weights, optimizer and the loop's `training_state`."""
        ...

    def frozen_model(
        self, path: Path, *, precision: str, tokenizer_sha256: str, data_dir: Path
    ) -> ForwardModel:
        """A second model (the online teacher) sharded like the student, without optimizer state."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` in place over every rank of the job."""
        ...

    def broadcast_from_main(self, value: Any) -> Any:
        """The main rank's `value` on every rank (a small picklable object)."""
        ...

    def close(self) -> None:
        """Leave the process group (the process may then build another engine)."""
        ...


class TeacherJob(Protocol):
    """A teacher on its own layout (`teacher.parallel`), as the cache stage runs it: the world's facts
    and the factory of the frozen model. Built by `distill.engine.teacher_job`."""

    engine: str  # what runs the teacher (`teacher.engine`, resolved): megatron, transformers, deepspeed
    device: torch.device
    dp_rank: int
    dp_size: int
    is_main: bool
    loss_rank: bool  # this rank receives the forward callbacks
    counting_rank: bool  # the one rank of its replica that keeps what the callbacks give (the writer)
    lockstep: bool  # every forward is collective over ranks of several replicas (an expert-parallel teacher)
    description: str

    def frozen_model(
        self, path: Path, *, precision: str, tokenizer_sha256: str, data_dir: Path
    ) -> ForwardModel:
        """The teacher at `path`, this rank's shard of it, without gradients (collective)."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> None: ...

    def broadcast_from_main(self, value: Any) -> Any: ...

    def close(self) -> None: ...
