"""The distillation loop, engine-free: what a step means, not how the model is sharded.

`DistillLoop(config, engine)` runs `training.steps` optimizer steps over an `Engine`
(`distill/engine/base.py`). Each step: the domain mixture draws the global batch (the same on every
rank), this data-parallel replica takes its slice and splits it into micro-batches, the teacher source
gives each micro-batch's signal (and reads the next step's ahead), the engine runs forward/backward
with the objective as its loss callback and steps the optimizer, the loss reports are reduced to global
token means, TAID advances its tau, DDK reweights the mixture every `data.mixture.interval` steps.
Every `training.log_interval` steps a metrics record, every `training.eval_interval` steps (and at
the end) the student's held-out perplexity per domain, every `checkpoint.interval` steps (and at the
end) a checkpoint with the loop's training state (step, objective, mixture).

A stop request (`distill/stop.py`: preemption, a time limit, a budget) is agreed by all ranks before
each step and between the passes of a DDK update or an evaluation. The loop then saves a checkpoint of
the last finished step, noting which of that step's DDK update and evaluation did not finish
(`pending`); a resumed run does those first, so a stopped-and-resumed run equals an uninterrupted one.

This module reads no engine internals: a second engine (DeepSpeed ZeRO) runs the same loop.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distill.cache.reader import SequenceKey
from distill.config import CampaignConfig
from distill.config.loss import LossConfig, LossWeightsConfig
from distill.data.mixture import Row, rank_slice
from distill.data.prepared import PreparedData
from distill.data.tokenizer import load_tokenizer
from distill.engine.base import Engine
from distill.errors import DataError
from distill.eval.text import packed_label_bytes, token_bytes
from distill.metrics import MetricsLogger
from distill.provenance import run_provenance
from distill.stop import NEVER, StopRequest, StopRequested
from distill.teacher import MicroBatch, TeacherSource, open_teacher_source
from distill.training.ddk import DomainMixture
from distill.training.evaluate import heldout_cross_entropy
from distill.training.objective import Objective
from distill.training.sample_log import SampleLog
from distill.training.throughput import (
    StepTimer,
    device_label,
    flops_per_token,
    peak_memory_gib,
    peak_tflops,
)


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


class DistillLoop:
    def __init__(
        self,
        config: CampaignConfig,
        engine: Engine,
        teacher_facts: dict[str, Any] | None = None,
        stop: StopRequest = NEVER,
    ) -> None:
        """`teacher_facts` (main rank): the teacher's path, mode, parameters and content hash, recorded
        in every checkpoint for the model card (`train.teacher_facts`). `stop`: this rank's view of a
        stop request (agreed over all ranks before acting)."""
        assert config.training is not None and config.checkpoint is not None and config.logging is not None
        self.config, self.engine, self.cfg = config, engine, config.training
        self.data = PreparedData(config.data.dir)
        self._check_tokenizer()
        self.objective = Objective(config.loss, shard=engine.shard, total_steps=self.cfg.steps)
        self.eval_objective = Objective(
            LossConfig(weights=LossWeightsConfig(ce=1.0), chunk_tokens=config.loss.chunk_tokens),
            shard=engine.shard,
            total_steps=self.cfg.steps,
        )
        sizes = {domain: self.data.num_sequences(domain) for domain in self.data.domains}
        self.mixture = DomainMixture(config.data.mixture, sizes, self.cfg.seed)
        self.step = 0
        self.stop = stop
        self.pending: list[str] = []  # post-step work of `self.step` not done yet: "mixture", "eval"
        self._saved_step = 0
        state = engine.resume()
        if state is not None:
            self.load_state_dict(state)
        self.teacher: TeacherSource | None = None
        if self.objective.needs_teacher or self.mixture.is_ddk:
            self.teacher = open_teacher_source(config, self.data, engine, self.eval_objective)
            self._say(f"train: teacher signal from {self.teacher.description}")
        self.metrics = MetricsLogger(
            config.logging,
            enabled=engine.is_main,
            run_name=config.run.name,
            run_dir=config.run.dir,
            config=config.model_dump(mode="json"),
        )
        self.provenance = self._provenance(teacher_facts) if engine.is_main else None  # in every checkpoint
        self.sample_log = (
            SampleLog(config.logging.samples, self.step)
            if config.logging.samples is not None and engine.is_main
            else None
        )
        self.timer = StepTimer(engine.device)
        self._cost = self._step_cost()
        self._label_bytes: dict[str, int] | None = None
        if state is None:
            self.metrics.log(0, self._run_facts())
            record = self.mixture.start(self._student_perplexity, self._teacher_perplexity)
            if record is not None:
                self.metrics.log(0, record)
                self._say(f"train: DDK initial weights {self._weights_text()}")
            if self.teacher is not None and self.cfg.eval_sequences:
                self._log_teacher_reference()
        elif self.mixture.is_ddk and self.mixture.teacher_ppl is None:  # a run switched to DDK on resume
            self.mixture.teacher_ppl = self._teacher_perplexity()

    # -- the training state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_sequences": self.step * self.cfg.global_batch,
            "objective": self.objective.state_dict(),
            "mixture": self.mixture.state_dict(),
            "provenance": self.provenance,
            "pending": list(self.pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = self._saved_step = int(state["step"])
        self.pending = list(state.get("pending", []))
        self.objective.load_state_dict(state.get("objective", {}))
        if "mixture" not in state:
            raise DataError(
                f"checkpoint {state.get('checkpoint', '(resumed)')} has no data-mixture state (written by an "
                "older distillery); start a new run directory or restart from it as `student.init`"
            )
        self.mixture.load_state_dict(state["mixture"])

    def save(self) -> None:
        self.engine.save(self.step, self.state_dict())
        self._saved_step = self.step

    def _check_stop(self) -> None:
        """Collective: raise `StopRequested` on every rank when any rank was asked to stop."""
        self.stop.check(self.engine.all_reduce_sum, self.engine.device)

    # -- one step -----------------------------------------------------------------------------------

    def _micro_batch_keys(self, batch: list[Row]) -> list[list[SequenceKey]]:
        """Sequence keys of this replica's micro-batches of a global batch."""
        mine = rank_slice(batch, self.engine.dp_rank, self.engine.dp_size)
        keys = [(domain, "train", index) for domain, index in mine]
        return [keys[i : i + self.cfg.micro_batch] for i in range(0, len(keys), self.cfg.micro_batch)]

    def train_step(self) -> StepResult:
        started = time.perf_counter()
        self.timer.start()
        batch = self.mixture.next_batch(self.cfg.global_batch)  # the global batch, the same on every rank
        micro = []
        for keys in self._micro_batch_keys(batch):
            tokens = np.stack([self.data.sequence(domain, index) for domain, _, index in keys])
            micro.append(MicroBatch(keys, torch.from_numpy(tokens).to(self.engine.device)))  # [mb, s + 1]
        self.timer.mark("data")
        signals: list[Any] = [None] * len(micro)
        if self.teacher is not None and self.objective.needs_teacher:
            signals = self.teacher.signals(micro)
            if self.step + 1 < self.cfg.steps:
                self.teacher.read_ahead(
                    self._micro_batch_keys(self.mixture.peek_batch(self.cfg.global_batch))
                )
            # a cache's wait for its read-ahead, or a live teacher's forward pass
            self.timer.mark("teacher_forward" if self.teacher.arch is not None else "teacher_wait")
        tau = self.objective.tau if self.objective.taid is not None else None
        reports = self.engine.forward_backward(
            [m.tokens for m in micro],
            lambda index, hidden, weight, labels: self.objective(hidden, weight, labels, signals[index]),
        )
        self.timer.mark("forward_backward")
        grad_norm, lr = self.engine.optimizer_step(self.step)
        self.timer.mark("optimizer")
        means, count = self._reduce_reports(reports)
        self.step += 1
        self.objective.after_step(means, self.step)
        self.timer.mark("other")
        seconds = time.perf_counter() - started  # the step itself; a DDK evaluation is not training time
        loss = means.pop("loss")
        phases = dict(self.timer.seconds)
        if self.sample_log is not None:
            self.sample_log.write(self.step, batch)
        self.pending = self._post_step_work()
        mixture = self._pending_mixture()  # may stop (raise) mid-way: the step is saved with it pending
        return StepResult(self.step, loss, grad_norm, lr, count, seconds, means, tau, mixture, phases, batch)

    def _reduce_reports(self, reports: list[dict]) -> tuple[dict[str, float], int]:
        """Global token means of the loss and each term: the counting ranks' sums, reduced over all."""
        keys = self.objective.report_keys
        device = self.engine.device
        sums = torch.zeros(len(keys), dtype=torch.float64, device=device)  # NCCL: on the device
        if self.engine.counting_rank:
            for r in reports:
                sums += torch.tensor([float(r[k]) for k in keys], dtype=torch.float64, device=device)
        self.engine.all_reduce_sum(sums)
        tokens = float(sums[-1])
        return {k: float(v) / tokens for k, v in zip(keys[:-1], sums[:-1], strict=True)}, int(tokens)

    # -- evaluation ---------------------------------------------------------------------------------

    def _heldout(self, score: Any, sequences: int) -> dict[str, float]:
        """Held-out perplexity per domain (what DDK compares)."""
        return {domain: math.exp(value) for domain, value in self._heldout_ce(score, sequences).items()}

    def _heldout_ce(self, score: Any, sequences: int) -> dict[str, float]:
        return heldout_cross_entropy(
            score,
            self.data,
            self.engine,
            sequences=sequences,
            micro_batch=self.cfg.micro_batch,
            check_stop=self._check_stop,
        )

    def _eval_record(self, prefix: str, ce: dict[str, float]) -> dict[str, float]:
        """ce, ppl and bits per byte per domain. Bits per byte of packed sequences: the summed NLL of
        every predicted token (EOS included) over the UTF-8 bytes of those tokens; `distillery eval`
        scores complete documents with rolling windows instead (README, "Evaluation")."""
        if self._label_bytes is None:
            table = token_bytes(self.tokenizer)
            self._label_bytes = {
                d: packed_label_bytes(self.data, d, self.cfg.eval_sequences, table) for d in self.data.domains
            }
        record = {}
        for domain, value in ce.items():
            tokens = (
                min(self.cfg.eval_sequences, self.data.num_sequences(domain, "heldout")) * self.data.seq_len
            )
            record[f"{prefix}/{domain}/ce"] = value
            record[f"{prefix}/{domain}/ppl"] = math.exp(value)
            if self._label_bytes[domain]:
                record[f"{prefix}/{domain}/bpb"] = value * tokens / math.log(2) / self._label_bytes[domain]
        return record

    def _log_teacher_reference(self) -> None:
        """The teacher's held-out numbers on the sequences the student is evaluated on (step 0)."""
        assert self.teacher is not None
        record = self._eval_record(
            "teacher", self._heldout_ce(self.teacher.cross_entropy, self.cfg.eval_sequences)
        )
        self.metrics.log(0, record)

    def _student_cross_entropy(self, micro: list[MicroBatch]) -> list[tuple[float, int] | None]:
        return self.eval_objective.cross_entropy(self.engine, micro)

    def _student_perplexity(self, sequences: int | None = None) -> dict[str, float]:
        """Held-out perplexity per domain (collective: every rank gets the same numbers)."""
        return self._heldout(
            self._student_cross_entropy, sequences or self.config.data.mixture.eval_sequences
        )

    def _teacher_perplexity(self) -> dict[str, float]:
        assert self.teacher is not None
        return self._heldout(self.teacher.cross_entropy, self.config.data.mixture.eval_sequences)

    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity per domain on `training.eval_sequences` sequences each."""
        return self._student_perplexity(self.cfg.eval_sequences)

    def evaluate_record(self) -> dict[str, float]:
        """The student's held-out ce, ppl and bits per byte per domain (`eval/<domain>/...`)."""
        return self._eval_record(
            "eval", self._heldout_ce(self._student_cross_entropy, self.cfg.eval_sequences)
        )

    # -- the run ------------------------------------------------------------------------------------

    def run(self) -> list[StepResult]:
        """Train to `training.steps`; on an agreed stop request, checkpoint and raise `StopRequested`."""
        results: list[StepResult] = []
        try:
            self._after_step(None)  # what a stopped run left of its last step (nothing on a fresh run)
            while self.step < self.cfg.steps:
                self._check_stop()
                result = self.train_step()
                results.append(result)
                self._after_step(result)
        except StopRequested as stop:
            if self.step > self._saved_step or self.pending:
                self.save()
            self._say(
                f"train: {stop.reason}: stopped after step {self.step}"
                + (f" (left for the resumed run: {', '.join(self.pending)})" if self.pending else "")
                + "; re-running resumes from its checkpoint"
            )
            self.close()
            raise
        self.close()
        return results

    def _post_step_work(self) -> list[str]:
        """What follows the step just taken, in order: DDK's update and the held-out evaluation."""
        work = []
        if self.mixture.is_ddk and self.step % self.config.data.mixture.interval == 0:
            work.append("mixture")
        interval = self.cfg.eval_interval
        last = self.step == self.cfg.steps
        if self.cfg.eval_sequences and ((interval and self.step % interval == 0) or last):
            work.append("eval")
        return work

    def _pending_mixture(self) -> dict[str, Any] | None:
        """DDK's update after this step, if it is due and not done yet; returns what it logged."""
        if "mixture" not in self.pending:
            return None
        record = self.mixture.after_step(self.step, self._student_perplexity)
        self.pending.remove("mixture")
        if record is not None:
            self.metrics.log(self.step, record)
            self._say(f"train: DDK weights at step {self.step}: {self._weights_text()}")
        return record

    def _after_step(self, result: StepResult | None) -> None:
        """Log the step, do its pending work (each item is removed once done), checkpoint when due.
        With `result` None: only the work a stopped run left for the step it saved."""
        assert self.config.checkpoint is not None
        last = self.step == self.cfg.steps
        if result is not None and (result.step % self.cfg.log_interval == 0 or last):
            self._log(result)
        self._pending_mixture()
        if "eval" in self.pending:
            self._log_eval()
            self.pending.remove("eval")
        if result is not None and (result.step % self.config.checkpoint.interval == 0 or last):
            self.save()

    def close(self) -> None:
        self.metrics.close()
        if self.sample_log is not None:
            self.sample_log.close()
        if self.teacher is not None:
            self.teacher.close()

    def _check_tokenizer(self) -> None:
        prepared = self.data.tokenizer_sha256
        ours = self.tokenizer = load_tokenizer(self.engine.tokenizer_dir)
        if ours.sha256 != prepared:
            raise DataError(
                f"the student's tokenizer ({self.engine.tokenizer_dir}, sha256 {ours.sha256[:12]}) is not the one "
                f"the data in {self.data.directory} was prepared with (sha256 {prepared[:12]})"
            )
        if ours.vocab_size > self.engine.vocab_size:
            raise DataError(
                f"tokenizer has {ours.vocab_size} tokens but the student's vocabulary is {self.engine.vocab_size}"
            )

    def _say(self, message: str) -> None:
        if self.engine.is_main:
            print(message, file=sys.stderr, flush=True)

    def _weights_text(self) -> str:
        return ", ".join(f"{d} {w:.3f}" for d, w in self.mixture.sampler.weights_dict().items())

    def _provenance(self, teacher_facts: dict[str, Any] | None) -> dict[str, Any]:
        """What the exported model card says about this run (main rank)."""
        teacher = None
        if teacher_facts is not None and self.teacher is not None:
            teacher = {**teacher_facts, "signal": self.teacher.description}
        return run_provenance(self.config, self.data.manifest, teacher)

    def _step_cost(self) -> dict[str, Any]:
        """Model FLOPs of one step over the job, and the peak of one device (None on CPU)."""
        seq_len, tokens = self.data.seq_len, self.cfg.global_batch * self.data.seq_len
        flops = flops_per_token(self.engine.arch, seq_len, backward=True)
        teacher = self.teacher.arch if self.teacher is not None and self.objective.needs_teacher else None
        if teacher is not None:
            flops += flops_per_token(teacher, seq_len, backward=False)
        world = self.engine.dp_size * self.config.parallel.tp * self.config.parallel.pp
        peak = peak_tflops(self.cfg.peak_tflops, self.engine.device)
        return {"step_flops": flops * tokens, "devices": world, "peak_tflops": peak}

    def _run_facts(self) -> dict[str, Any]:
        """Logged once at step 0: what the throughput numbers are relative to."""
        return {
            "device": device_label(self.engine.device),
            "devices": self._cost["devices"],
            "peak_tflops": self._cost["peak_tflops"],
            "model_flops_per_step": self._cost["step_flops"],
            "student_parameters": self.engine.num_parameters,
            "tokens_per_step": self.cfg.global_batch * self.data.seq_len,
        }

    def _log(self, result: StepResult) -> None:
        achieved = self._cost["step_flops"] / result.seconds / self._cost["devices"] / 1e12  # per device
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
        if self._cost["peak_tflops"]:
            record["mfu"] = achieved / self._cost["peak_tflops"]
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
        record = self.evaluate_record()
        if record:
            self.metrics.log(self.step, record)
            shown = ", ".join(
                f"{key.split('/')[1]} {value:.2f} ({record.get(key[:-3] + 'bpb', math.nan):.3f} bits/byte)"
                for key, value in record.items()
                if key.endswith("/ppl")
            )
            self._say(f"train: held-out perplexity at step {self.step}: {shown}")
        return record
