"""The prune stage: importance on the teacher's ranks, then the cut, then the step-0 comparison.

Three steps, each skipped when its output is complete for this config (the stage contract):

1. `measure_importance` (every rank of the teacher's tp x pp x dp world; `distillery prune --measure`):
   the scores of `importance.py`, written by the main rank to `prune.dir/importance.json` with the spec
   they were measured for (teacher hash, prepared data, calibration set, layers to drop).
2. `write_student` (one process): the kept units chosen from the scores (`plan.py`) and the teacher's
   tensors cut to them (`cut.py`), written atomically as an HF directory at `student.init_dir`, where the
   train stage (either engine) starts from it. Its record (`distillery_prune.json`) holds the spec, the
   kept indices and the measured depth choice.
3. `evaluate_step0` (one process): held-out bits per byte of the pruned student and of a random init of
   the same architecture (the train stage's seed), before any training: `prune.dir/step0/eval.json`,
   which the report shows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from distill.atomic import atomic_write_json, read_json
from distill.config import CampaignConfig
from distill.config.prune import PRUNE_RECORD
from distill.data.prepared import PreparedData
from distill.data.tokenizer import load_tokenizer
from distill.errors import DataError
from distill.messages import say
from distill.models.weights import Weights, directory_sha256, find_weights
from distill.prune.plan import KeptUnits, choose_units, pruned_arch
from distill.stage import StageOutput, Status
from parallel.model import ModelArch

IMPORTANCE = "importance.json"
STEP0 = "step0"  # prune.dir/step0: eval.json of the pruned student and a random init


def teacher_weights(config: CampaignConfig) -> tuple[Weights, ModelArch]:
    """The teacher to prune: megatron-core's mapping of it, sharing the data's tokenizer."""
    assert config.teacher is not None
    weights = find_weights(config.teacher.path)
    arch = weights.megatron_arch("teacher.path")
    data = PreparedData(config.data.dir)
    found = load_tokenizer(weights.tokenizer_dir)
    if found.sha256 != data.tokenizer_sha256:
        raise DataError(
            f"prune: the teacher's tokenizer ({weights.tokenizer_dir}, sha256 {found.sha256[:12]}) is not the "
            f"student's ({config.data.tokenizer.path}, sha256 {data.tokenizer_sha256[:12]}); a pruned student "
            "keeps its teacher's vocabulary, so both must share one tokenizer"
        )
    return weights, arch


class PruneStage:
    def __init__(self, config: CampaignConfig) -> None:
        assert config.prune is not None and config.student is not None and config.student.init_dir is not None
        self.config, self.cfg = config, config.prune
        self.weights, self.teacher = teacher_weights(config)
        self.target = pruned_arch(config, self.teacher)
        self.drop = self.teacher.num_layers - self.target.num_layers
        self.data = PreparedData(config.data.dir)
        self.out = config.student.init_dir
        self._sha: str | None = None

    @property
    def teacher_sha256(self) -> str:
        if self._sha is None:
            self._sha = directory_sha256(self.weights.directory)
        return self._sha

    def importance_spec(self) -> dict[str, Any]:
        return {
            "teacher_sha256": self.teacher_sha256,
            "prepared_fingerprint": self.data.fingerprint,
            "calibration_sequences": self.cfg.calibration_sequences,
            "depth": {"drop": self.drop, "measured": self.cfg.method in ("depth", "both")},
        }

    def student_spec(self) -> dict[str, Any]:
        return {
            **self.importance_spec(),
            "method": self.cfg.method,
            "depth_metric": self.cfg.depth_metric,
            "target": self.target.to_json(),
        }

    def importance(self) -> dict[str, Any] | None:
        """The measured scores, if `prune.dir` holds them for this spec."""
        path = self.cfg.dir / IMPORTANCE
        if not path.is_file():
            return None
        found = read_json(path)
        return found["scores"] if found.get("spec") == self.importance_spec() else None

    def student_output(self) -> StageOutput:
        return StageOutput(
            "prune",
            self.out,
            "student.init_dir",
            self.student_spec(),
            record=PRUNE_RECORD,
            foreign_hint="it holds another student (a random init?): choose another student.init_dir or delete it",
        )

    def write_student(self, *, overwrite: bool) -> KeptUnits | None:
        """Cut the teacher into `student.init_dir` (None: it is complete already)."""
        output = self.student_output()
        if output.check(overwrite=overwrite) is Status.COMPLETE:
            say("prune", f"{self.out} holds this pruned student, nothing to do")
            return None
        scores = self.importance()
        if scores is None:
            raise DataError(
                f"prune: no importance scores for this config in {self.cfg.dir}; measure them first"
            )
        from distill.models.hf_io import generation_config, write_hf_directory
        from distill.prune.cut import cut_state_dict

        kept = choose_units(self.teacher, self.target, self.cfg.method, self.cfg.depth_metric, scores)
        state = cut_state_dict(self._reader(), self.teacher, kept)
        record = {
            "spec": self.student_spec(),
            "teacher": str(self.config.teacher.path) if self.config.teacher else None,
            "kept": kept.to_json(),
            "depth_loss": scores.get("depth_loss"),
            "calibration": scores["calibration"],
        }
        write_hf_directory(
            self.out,
            state,
            self.target,
            tokenizer_dir=self.weights.tokenizer_dir,
            dtype=torch.float32,
            generation=generation_config(self.weights.tokenizer_dir),
            overwrite=self.out.exists(),
            extra_files={PRUNE_RECORD: json.dumps(record, indent=2) + "\n"},
        )
        say(
            "prune",
            f"{self.cfg.method}: {self.teacher.num_parameters() / 1e6:.2f}M -> "
            f"{self.target.num_parameters() / 1e6:.2f}M parameters, written to {self.out}",
        )
        return kept

    def _reader(self) -> Any:
        """Whole teacher tensors by HF name, one at a time (an HF directory read lazily; a checkpoint
        converted once, in this process)."""
        if self.weights.kind == "hf":
            from distill.models.hf_io import HFCheckpoint

            hf = HFCheckpoint(self.weights.directory)
            return lambda name: hf.read(name, slice(None), slice(None))
        from distill.engine.megatron.convert import load_as_hf

        model, _ = load_as_hf(self.weights.directory)
        state = model.state_dict()
        return lambda name: state[name]

    def evaluate_step0(self, *, progress: bool) -> dict[str, Any]:
        """Held-out bits per byte of the pruned student and of a random init of its shape, untrained."""
        from distill.eval.run import EvalSettings, ModelToEval, evaluate
        from distill.models.student import write_random_student

        assert self.config.training is not None
        random_dir = self.cfg.dir / "random-init"
        if (random_dir / "config.json").is_file() and ModelArch.from_hf_config(
            read_json(random_dir / "config.json")
        ) != self.target:
            shutil.rmtree(random_dir)  # of another target: derived data, made again
        if not (random_dir / "config.json").is_file():
            write_random_student(
                self.target,
                random_dir,
                tokenizer_dir=self.weights.tokenizer_dir,
                seed=self.config.training.seed,
            )
        sequences = self.config.eval.sequences if self.config.eval is not None else 32
        models = [ModelToEval("pruned", self.out), ModelToEval("random init", random_dir)]
        return evaluate(
            models,
            self.config.data.dir,
            self.cfg.dir / STEP0,
            EvalSettings(sequences=sequences),
            key="prune.dir",
            progress=progress,
            show_table=True,
        )


def measure_importance(config: CampaignConfig, ctx: Any = None) -> None:
    """Collective over the teacher's world (`teacher.parallel`): the importance scores into
    `prune.dir/importance.json` (skipped when they are there for this spec). Joins the world unless `ctx`
    (a megatron parallel context at the teacher's layout, for tests) is given."""
    from distill.config.train import ParallelConfig
    from distill.engine.megatron.teacher import MegatronTeacherJob
    from distill.prune.importance import measure

    assert config.prune is not None and config.teacher is not None
    stage = PruneStage(config)
    layout = config.teacher.layout
    job = MegatronTeacherJob(ParallelConfig(tp=layout.tp, pp=layout.pp), ctx)
    try:
        done = job.broadcast_from_main(stage.importance() is not None if job.is_main else None)
        if done:
            say("prune", f"{config.prune.dir / IMPORTANCE} is complete, nothing to do")
            return
        spec = job.broadcast_from_main(stage.importance_spec() if job.is_main else None)
        model = job.frozen_model(
            stage.weights.directory,
            precision=config.teacher.precision,
            tokenizer_sha256=stage.data.tokenizer_sha256,
            data_dir=stage.data.directory,
        )
        if job.is_main:
            say(
                "prune",
                f"importance of {stage.teacher.num_layers} layers on {config.prune.calibration_sequences} "
                f"calibration sequences ({job.description})",
            )
        scores = measure(config, model, job.ctx, job.all_reduce_sum, stage.drop)
        if job.is_main:
            config.prune.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(config.prune.dir / IMPORTANCE, {"spec": spec, "scores": scores})
    finally:
        job.close()


def step0_table(prune_dir: Path) -> dict[str, Any] | None:
    """The step-0 evaluation, if the stage wrote one (for the report)."""
    path = prune_dir / STEP0 / "eval.json"
    return read_json(path) if path.is_file() else None
