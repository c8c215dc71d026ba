"""The training loop: megatron-core model + DDP + pipeline schedule, our optimizer, checkpoints, metrics.

`train(config)` is the whole `distillery train` stage: join the world, build this rank's shard of the
student, start from the latest checkpoint of the run (resume) or from the configured initial weights,
then run `training.steps` optimizer steps. Each step: this rank's slice of the global batch, split
into micro-batches, the teacher signal of those micro-batches (cache rows read ahead, or a forward pass
of the online teacher), forward/backward through the pipeline schedule with the fused output-layer
loss (`objective.py`), a DDP gradient reduction, our AdamW step, TAID's tau update. Every
`checkpoint.interval` steps (and at the end) a sharded checkpoint; every `training.log_interval` steps
a metrics record with each loss term; every `training.eval_interval` steps (and at the end) the
held-out perplexity of each domain.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distill.config import CampaignConfig
from distill.config.loss import LossConfig, LossWeightsConfig
from distill.data.mixture import rank_slice
from distill.data.prepared import PreparedData
from distill.data.tokenizer import load_tokenizer
from distill.errors import DataError, OutputExistsError
from distill.losses.teacher import Teacher
from distill.metrics import MetricsLogger
from distill.models.convert import checkpoint_meta, start_weights, tokenizer_of, write_random_student
from distill.models.hf_io import HFCheckpoint
from distill.models.hf_layout import Shard
from distill.training.ddk import DomainMixture
from distill.training.evaluate import heldout_cross_entropy
from distill.training.objective import Objective
from distill.training.optimizer import DistillOptimizer
from distill.training.teacher_signal import CachedTeacher, OnlineTeacher, open_cache
from parallel.distributed import ParallelContext, init_parallel, shutdown
from parallel.model import ModelArch, build_gpt, emit_hidden_states, output_weight, precision_dtype
from parallel.schedule import run_schedule
from parallel.vocab import VocabShard


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


def configured_arch(config: CampaignConfig) -> ModelArch:
    """The architecture `student.arch` describes, with the tokenizer's vocabulary padded to 128."""
    arch = config.student.arch if config.student else None
    assert arch is not None
    vocab = load_tokenizer(config.data.tokenizer.path).vocab_size
    return ModelArch(
        model_type=arch.model_type,
        vocab_size=-(-vocab // 128) * 128,  # padded so any tp up to 128 splits it
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
        ffn_hidden_size=arch.ffn_hidden_size,
        head_dim=arch.hidden_size // arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings,
        qkv_bias=arch.model_type == "qwen2",
    )


def student_source(config: CampaignConfig, ctx: ParallelContext) -> Path:
    """The student's initial weights; a random student is written once (main rank) as an HF dir,
    and an existing one must have the configured architecture."""
    student = config.student
    assert student is not None
    if student.init is not None:
        return student.init
    assert student.init_dir is not None
    problem: list[str | None] = [None]
    if ctx.is_main:
        wanted = configured_arch(config)
        if not (student.init_dir / "config.json").is_file():
            write_random_student(
                wanted, student.init_dir, tokenizer_dir=config.data.tokenizer.path, seed=config.training.seed
            )
        elif (found := HFCheckpoint(student.init_dir).arch) != wanted:
            diff = [
                f"{k}: {v!r} there vs {wanted.to_json()[k]!r}"
                for k, v in found.to_json().items()
                if v != wanted.to_json()[k]
            ]
            problem[0] = (
                f"student.init_dir {student.init_dir} holds a student of another architecture ({', '.join(diff)}); "
                "delete it or choose another init_dir"
            )
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise OutputExistsError(problem[0])
    return student.init_dir


class Trainer:
    def __init__(self, config: CampaignConfig, ctx: ParallelContext) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        assert config.training is not None and config.checkpoint is not None and config.logging is not None
        self.config, self.ctx, self.cfg = config, ctx, config.training
        self.data = PreparedData(config.data.dir)
        self.seq_len = self.data.seq_len
        self.micro_batches = ctx.dims.global_batch_split(self.cfg.global_batch, self.cfg.micro_batch)
        arch, source, kind = start_weights(student_source(config, ctx))
        self.arch, self.tokenizer_dir = arch, tokenizer_of(source, kind)
        self._check_tokenizer()
        self.dtype = precision_dtype(self.cfg.precision)
        model = build_gpt(arch, ctx.dims, pp_rank=ctx.pp_rank, dtype=self.dtype)
        model.config.calculate_per_token_loss = True  # gradients of the token-mean over the global batch
        self.model = model
        self.ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
            module=model,
        )
        model.config.no_sync_func = self.ddp.no_sync
        model.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = DistillOptimizer(model, self.cfg, mp_group=ctx.mp_group, tp_rank=ctx.tp_rank)
        emit_hidden_states(model)  # the last stage hands hidden states to the fused loss
        self.shard = VocabShard.of(arch.vocab_size, ctx.tp_rank, ctx.dims.tp, ctx.tp_group)
        self.objective = Objective(config.loss, shard=self.shard, total_steps=self.cfg.steps)
        self.eval_objective = Objective(
            LossConfig(weights=LossWeightsConfig(ce=1.0), chunk_tokens=config.loss.chunk_tokens),
            shard=self.shard,
            total_steps=self.cfg.steps,
        )
        sizes = {domain: self.data.num_sequences(domain) for domain in self.data.domains}
        self.mixture = DomainMixture(config.data.mixture, sizes, self.cfg.seed)
        self.step = 0
        resume = latest_checkpoint(config.checkpoint.dir)
        if resume is not None:
            state = load_checkpoint(resume, model=model, optimizer=self.optimizer, ctx=ctx)["training_state"]
            self.step = int(state["step"])
            self.objective.load_state_dict(state.get("objective", {}))
            if "mixture" not in state:
                raise DataError(
                    f"checkpoint {resume} has no data-mixture state (written by an older distillery); "
                    "start a new run directory or restart from it as `student.init`"
                )
            self.mixture.load_state_dict(state["mixture"])
            self._say(f"train: resumed from {resume} at step {self.step}")
        elif kind == "checkpoint":
            load_checkpoint(source, model=model, optimizer=None, ctx=ctx)
            self._say(f"train: starting from checkpoint {source}")
        else:
            HFCheckpoint(source).load_into(model, Shard(arch, ctx.dims, ctx.tp_rank, ctx.pp_rank))
            self._say(
                f"train: starting from {source} ({arch.num_parameters() / 1e6:.1f}M parameters, {ctx.dims})"
            )
        needs_teacher = self.objective.needs_teacher or self.mixture.is_ddk
        self.teacher = self._open_teacher() if needs_teacher else None
        self.metrics = MetricsLogger(
            config.logging,
            enabled=ctx.is_main,
            run_name=config.run.name,
            run_dir=config.run.dir,
            config=config.model_dump(mode="json"),
        )
        if resume is None:
            record = self.mixture.start(self._student_perplexity, self._teacher_perplexity)
            if record is not None:
                self.metrics.log(0, record)
                self._say(f"train: DDK initial weights {self._weights_text()}")
        elif self.mixture.is_ddk and self.mixture.teacher_ppl is None:  # a run switched to DDK on resume
            self.mixture.teacher_ppl = self._teacher_perplexity()

    def _say(self, message: str) -> None:
        if self.ctx.is_main:
            print(message, file=sys.stderr, flush=True)

    def _check_tokenizer(self) -> None:
        prepared = self.data.tokenizer_sha256
        ours = load_tokenizer(self.tokenizer_dir)
        if ours.sha256 != prepared:
            raise DataError(
                f"the student's tokenizer ({self.tokenizer_dir}, sha256 {ours.sha256[:12]}) is not the one the data "
                f"in {self.data.directory} was prepared with (sha256 {prepared[:12]})"
            )
        if ours.vocab_size > self.arch.vocab_size:
            raise DataError(
                f"tokenizer has {ours.vocab_size} tokens but the student's vocabulary is {self.arch.vocab_size}"
            )

    def _open_teacher(self) -> CachedTeacher | OnlineTeacher:
        teacher = self.config.teacher
        assert teacher is not None
        if teacher.mode == "online":
            online = OnlineTeacher(self.config, self.data, self.ctx, self.arch)
            self._say(
                f"train: online teacher {teacher.path} ({online.arch.num_parameters() / 1e6:.1f}M parameters)"
            )
            return online
        signal = open_cache(self.config, self.data, self.arch.vocab_size, self.ctx)
        self._say(f"train: teacher signal from cache {signal.directory} ({signal.mode})")
        return CachedTeacher(signal, active=self.ctx.is_last_stage, device=self.ctx.device)

    def _micro_batch_keys(self, rows: list[tuple[str, int]]) -> list[list[tuple[str, str, int]]]:
        """Cache keys of this rank's micro-batches of a global batch."""
        mine = rank_slice(rows, self.ctx.dp_rank, self.ctx.dims.dp)
        keys = [(domain, "train", index) for domain, index in mine]
        return [keys[i : i + self.cfg.micro_batch] for i in range(0, len(keys), self.cfg.micro_batch)]

    def _weights_text(self) -> str:
        return ", ".join(f"{d} {w:.3f}" for d, w in self.mixture.sampler.weights_dict().items())

    def _student_perplexity(self, sequences: int | None = None) -> dict[str, float]:
        """Held-out perplexity per domain (collective: every rank gets the same numbers)."""
        ce = heldout_cross_entropy(
            self.ddp,
            self._forward_step,
            self.eval_objective,
            self.data,
            self.ctx,
            sequences=sequences or self.config.data.mixture.eval_sequences,
            micro_batch=self.cfg.micro_batch,
        )
        return {domain: math.exp(value) for domain, value in ce.items()}

    def _teacher_perplexity(self) -> dict[str, float]:
        assert self.teacher is not None
        ce = self.teacher.heldout_cross_entropy(
            self.data,
            self.eval_objective,
            sequences=self.config.data.mixture.eval_sequences,
            micro_batch=self.cfg.micro_batch,
        )
        return {domain: math.exp(value) for domain, value in ce.items()}

    def _forward_step(
        self,
        batch: tuple[torch.Tensor, Teacher | None],
        model: torch.nn.Module,
        objective: Objective | None = None,
    ) -> tuple[torch.Tensor, Any]:
        # batch: tokens [mb, seq_len + 1] -> inputs and labels [mb, seq_len], and the teacher signal
        tokens, teacher = batch if isinstance(batch, tuple) else (batch, None)
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
        output = model(inputs, positions, attention_mask=None)  # last stage: hidden [mb, s, h]
        loss = objective or self.objective
        return output, lambda hidden: loss(hidden, output_weight(self.model), labels, teacher)

    def train_step(self) -> StepResult:
        started = time.perf_counter()
        batch = self.mixture.next_batch(self.cfg.global_batch)  # the global batch, the same on every rank
        rows = rank_slice(batch, self.ctx.dp_rank, self.ctx.dims.dp)
        tokens = torch.from_numpy(np.stack([self.data.sequence(d, i) for d, i in rows])).to(self.ctx.device)
        micro = list(tokens.split(self.cfg.micro_batch))
        teachers: list[Teacher | None] = [None] * len(micro)
        if isinstance(self.teacher, CachedTeacher) and self.objective.needs_teacher:
            ahead = self.mixture.peek_batch(self.cfg.global_batch) if self.step + 1 < self.cfg.steps else None
            teachers = self.teacher.for_step(
                self._micro_batch_keys(batch), self._micro_batch_keys(ahead) if ahead else None
            )
        elif self.teacher is not None and self.objective.needs_teacher:
            teachers = self.teacher.for_step(micro)
        tau = self.objective.tau if self.objective.taid is not None else None
        self.ddp.zero_grad_buffer()
        reports = run_schedule(
            self.ddp,
            list(zip(micro, teachers, strict=True)),
            self._forward_step,
            seq_length=self.seq_len,
            micro_batch_size=self.cfg.micro_batch,
            forward_only=False,
        )
        grad_norm, lr = self.optimizer.step(self.step)
        means, count = self._reduce_reports(reports)
        self.step += 1
        self.objective.after_step(means, self.step)
        seconds = time.perf_counter() - started  # the step itself; a DDK evaluation is not training time
        mixture = self.mixture.after_step(self.step, self._student_perplexity)
        loss = means.pop("loss")
        return StepResult(self.step, loss, grad_norm, lr, count, seconds, means, tau, mixture)

    def _reduce_reports(self, reports: list[dict]) -> tuple[dict[str, float], int]:
        """Global token means of the loss and each term: the last stage's sums (tp rank 0 only, so each
        counts once), reduced over all ranks."""
        keys = self.objective.report_keys
        sums = torch.zeros(len(keys), dtype=torch.float64, device=self.ctx.device)  # NCCL: on the device
        if self.ctx.is_last_stage and self.ctx.tp_rank == 0:
            for r in reports:
                sums += torch.tensor([float(r[k]) for k in keys], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(sums)
        tokens = float(sums[-1])
        return {k: float(v) / tokens for k, v in zip(keys[:-1], sums[:-1], strict=True)}, int(tokens)

    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity per domain on `training.eval_sequences` sequences each."""
        return self._student_perplexity(self.cfg.eval_sequences)

    def save(self) -> Path:
        assert self.config.checkpoint is not None
        return save_checkpoint(
            self.config.checkpoint.dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            training_state={
                "step": self.step,
                "consumed_sequences": self.step * self.cfg.global_batch,
                "objective": self.objective.state_dict(),
                "mixture": self.mixture.state_dict(),
            },
            meta=checkpoint_meta(self.arch, self.config.run.name),
            ctx=self.ctx,
            tokenizer_dir=self.tokenizer_dir,
            keep_last=self.config.checkpoint.keep_last,
        )

    def _log(self, result: StepResult) -> None:
        record = {
            "loss": result.loss,
            **{f"loss/{name}": value for name, value in result.terms.items()},
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "tokens_per_s": result.tokens / result.seconds,
            "step_seconds": result.seconds,
        }
        if result.tau is not None:
            record["taid/tau"] = result.tau
        self.metrics.log(result.step, record)
        terms = " ".join(f"{name} {value:.4f}" for name, value in result.terms.items())
        tau = f" tau {result.tau:.4f}" if result.tau is not None else ""
        self._say(
            f"train: step {result.step}/{self.cfg.steps} loss {result.loss:.4f} ({terms}){tau} "
            f"grad_norm {result.grad_norm:.3f} lr {result.lr:.2e} {result.tokens / result.seconds:,.0f} tok/s"
        )

    def _log_eval(self) -> dict[str, float]:
        perplexity = self.evaluate()
        if perplexity:
            self.metrics.log(self.step, {f"eval/{domain}/ppl": value for domain, value in perplexity.items()})
            shown = ", ".join(f"{domain} {value:.2f}" for domain, value in perplexity.items())
            self._say(f"train: held-out perplexity at step {self.step}: {shown}")
        return perplexity

    def run(self) -> list[StepResult]:
        assert self.config.checkpoint is not None
        results = []
        while self.step < self.cfg.steps:
            result = self.train_step()
            results.append(result)
            last = result.step == self.cfg.steps
            if result.step % self.cfg.log_interval == 0 or last:
                self._log(result)
            if result.mixture is not None:
                self.metrics.log(result.step, result.mixture)
                self._say(f"train: DDK weights at step {result.step}: {self._weights_text()}")
            if result.step % self.config.checkpoint.interval == 0 or last:
                self.save()
            interval = self.cfg.eval_interval
            if self.cfg.eval_sequences and ((interval and result.step % interval == 0) or last):
                self._log_eval()
        self.metrics.close()
        return results


def train(config: CampaignConfig) -> list[StepResult]:
    """The `train` stage on this process (launched once per rank by torchrun or `distillery launch`)."""
    if not config.trains:
        raise DataError("this config has no training sections (student, training, checkpoint, logging)")
    ctx = init_parallel(config.parallel.tp, config.parallel.pp, seed=config.training.seed)
    try:
        return Trainer(config, ctx).run()
    finally:
        shutdown()
