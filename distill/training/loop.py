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

import time
from typing import Any

from distill.cache.reader import SequenceKey
from distill.config import CampaignConfig
from distill.data.mixture import Row, micro_batch_keys
from distill.data.prepared import PreparedData
from distill.data.tokenizer import TokenizerInfo, load_tokenizer
from distill.engine.base import Engine
from distill.errors import DataError
from distill.messages import say
from distill.metrics import MetricsLogger
from distill.provenance import run_provenance
from distill.stop import NEVER, StopRequest, StopRequested
from distill.teacher import MicroBatch, TeacherSource, open_teacher_source
from distill.training.ddk import DomainMixture
from distill.training.heldout import HeldoutEval
from distill.training.objective import Objective
from distill.training.sample_log import SampleLog
from distill.training.step_log import StepLog, StepResult
from distill.training.throughput import StepTimer

__all__ = ["DistillLoop", "StepResult"]


class DistillLoop:
    def __init__(
        self,
        config: CampaignConfig,
        engine: Engine,
        teacher_facts: dict[str, Any] | None = None,
        stop: StopRequest = NEVER,
    ) -> None:
        """Build the run: data, objective, mixture, the engine's resumed state, the teacher source,
        held-out evaluation, metrics (collective: resuming loads weights). `start()` then does the
        step-0 work. `teacher_facts` (main rank): the teacher's path, mode, parameters and content hash,
        recorded in every checkpoint for the model card (`train.teacher_facts`). `stop`: this rank's
        view of a stop request (agreed over all ranks before acting)."""
        assert config.training is not None and config.checkpoint is not None and config.logging is not None
        self.config, self.engine, self.cfg = config, engine, config.training
        self.data = PreparedData(config.data.dir)
        tokenizer = check_tokenizer(engine, self.data)
        self.objective = Objective(config.loss, shard=engine.shard, total_steps=self.cfg.steps)
        sizes = {domain: self.data.num_sequences(domain) for domain in self.data.domains}
        self.mixture = DomainMixture(config.data.mixture, sizes, self.cfg.seed)
        self.step, self.stop, self._saved_step, self.started = 0, stop, 0, False
        self.pending: list[str] = []  # post-step work of `self.step` not done yet: "mixture", "eval"
        self.heldout = HeldoutEval(config, self.data, engine, tokenizer, self._check_stop)
        self.resumed = engine.resume()
        if self.resumed is not None:
            self.load_state_dict(self.resumed)
        self.teacher: TeacherSource | None = None
        if self.objective.needs_teacher or self.mixture.is_ddk:
            self.teacher = open_teacher_source(config, self.data, engine, self.heldout.objective)
            say("train", f"teacher signal from {self.teacher.description}")
        self.heldout.teacher = self.teacher
        self.metrics = MetricsLogger(
            config.logging,
            enabled=engine.is_main,
            run_name=config.run.name,
            run_dir=config.run.dir,
            config=config.model_dump(mode="json"),
        )
        facts = None
        if teacher_facts is not None and self.teacher is not None:
            facts = {**teacher_facts, "signal": self.teacher.description}
        self.provenance = run_provenance(config, self.data.manifest, facts) if engine.is_main else None
        self.sample_log = (
            SampleLog(config.logging.samples, self.step)
            if config.logging.samples is not None and engine.is_main
            else None
        )
        self.timer = StepTimer(engine.device)
        live_teacher = (
            self.teacher.arch if self.teacher is not None and self.objective.needs_teacher else None
        )
        self.step_log = StepLog(config, engine, self.metrics, seq_len=self.data.seq_len, teacher=live_teacher)

    def start(self) -> None:
        """Step-0 work, collective: the run's facts, DDK's initial weights, the teacher's held-out
        reference (a fresh run); a run switched to DDK on resume measures its teacher first."""
        if self.started:
            return
        self.started = True
        if self.resumed is None:
            self.metrics.log(0, self.step_log.run_facts())
            record = self.mixture.start(self.heldout.student_perplexity, self.heldout.teacher_perplexity)
            if record is not None:
                self.metrics.log(0, record)
                say("train", f"DDK initial weights {self.mixture.weights_text()}")
            if self.teacher is not None and self.cfg.eval_sequences:
                self.metrics.log(0, self.heldout.teacher_record())
        elif self.mixture.is_ddk and self.mixture.teacher_ppl is None:
            self.mixture.teacher_ppl = self.heldout.teacher_perplexity()

    def evaluate(self) -> dict[str, float]:
        """The student's held-out perplexity per domain on `training.eval_sequences` sequences each."""
        return self.heldout.evaluate()

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
        self.mixture.load_state_dict(state["mixture"])

    def save(self) -> None:
        self.engine.save(self.step, self.state_dict())
        self._saved_step = self.step

    def _check_stop(self) -> None:
        """Collective: raise `StopRequested` on every rank when any rank was asked to stop."""
        self.stop.check(self.engine.all_reduce_sum, self.engine.device)

    # -- one step -----------------------------------------------------------------------------------

    def _micro_keys(self, batch: list[Row]) -> list[list[SequenceKey]]:
        """Sequence keys of this replica's micro-batches of a global batch."""
        return micro_batch_keys(batch, self.engine.dp_rank, self.engine.dp_size, self.cfg.micro_batch)

    def train_step(self) -> StepResult:
        started = time.perf_counter()
        self.timer.start()
        batch = self.mixture.next_batch(self.cfg.global_batch)  # the global batch, the same on every rank
        micro = [
            MicroBatch(keys, self.data.tokens(keys).to(self.engine.device))  # [mb, s + 1]
            for keys in self._micro_keys(batch)
        ]
        self.timer.mark("data")
        signals: list[Any] = [None] * len(micro)
        if self.teacher is not None and self.objective.needs_teacher:
            signals = self.teacher.signals(micro)
            if self.step + 1 < self.cfg.steps:
                self.teacher.read_ahead(self._micro_keys(self.mixture.peek_batch(self.cfg.global_batch)))
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
        means, count = self.objective.global_means(reports, self.engine)
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

    # -- the run ------------------------------------------------------------------------------------

    def run(self) -> list[StepResult]:
        """Train to `training.steps`; on an agreed stop request, checkpoint and raise `StopRequested`."""
        results: list[StepResult] = []
        try:
            self.start()
            self._after_step(None)  # what a stopped run left of its last step (nothing on a fresh run)
            while self.step < self.cfg.steps:
                self._check_stop()
                result = self.train_step()
                results.append(result)
                self._after_step(result)
        except StopRequested as stop:
            if self.step > self._saved_step or self.pending:
                self.save()
            say(
                "train",
                f"{stop.reason}: stopped after step {self.step}"
                + (f" (left for the resumed run: {', '.join(self.pending)})" if self.pending else "")
                + "; re-running resumes from its checkpoint",
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
        record = self.mixture.after_step(self.step, self.heldout.student_perplexity)
        self.pending.remove("mixture")
        if record is not None:
            self.metrics.log(self.step, record)
            say("train", f"DDK weights at step {self.step}: {self.mixture.weights_text()}")
        return record

    def _after_step(self, result: StepResult | None) -> None:
        """Log the step, do its pending work (each item is removed once done), checkpoint when due.
        With `result` None: only the work a stopped run left for the step it saved."""
        assert self.config.checkpoint is not None
        last = self.step == self.cfg.steps
        if result is not None and (result.step % self.cfg.log_interval == 0 or last):
            self.step_log.log(result)
        self._pending_mixture()
        if "eval" in self.pending:
            self.heldout.log_student(self.step, self.metrics)
            self.pending.remove("eval")
        if result is not None and (result.step % self.config.checkpoint.interval == 0 or last):
            self.save()

    def close(self) -> None:
        self.metrics.close()
        if self.sample_log is not None:
            self.sample_log.close()
        if self.teacher is not None:
            self.teacher.close()


def check_tokenizer(engine: Engine, data: PreparedData) -> TokenizerInfo:
    """The student's tokenizer, refused unless it is the one the data was prepared with."""
    ours = load_tokenizer(engine.tokenizer_dir)
    if ours.sha256 != data.tokenizer_sha256:
        raise DataError(
            f"the student's tokenizer ({engine.tokenizer_dir}, sha256 {ours.sha256[:12]}) is not the one "
            f"the data in {data.directory} was prepared with (sha256 {data.tokenizer_sha256[:12]})"
        )
    if ours.vocab_size > engine.vocab_size:
        raise DataError(
            f"tokenizer has {ours.vocab_size} tokens but the student's vocabulary is {engine.vocab_size}"
        )
    return ours
