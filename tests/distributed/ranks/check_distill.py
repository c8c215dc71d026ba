"""Distillation training on real gloo processes: online vs cached teacher, layouts, TAID resume.

argv: OUT_DIR WORK_DIR. WORK_DIR holds `online.yaml` (teacher.mode online), `cached.yaml` (top-k cache
with k = V), `sampled.yaml` (RS-KD cache), all over the same data, student and teacher; the caches are
built by `tests/distributed/test_distill.py` before the launch. Every run trains a few steps from the
same initial student; the report has the per-step losses, term means and TAID's tau.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from distill.checkpoint import latest_checkpoint, read_training_state
from distill.config import load_config
from distill.stop import StopRequest, StopRequested
from distill.training.loop import DistillLoop, StepResult
from distill.training.train import build_loop
from parallel.distributed import init_parallel, shutdown
from tests.distributed import report


def summary(results: list[StepResult]) -> dict[str, list]:
    return {
        "loss": [r.loss for r in results],
        "terms": [r.terms for r in results],
        "tau": [r.tau for r in results],
    }


class StopAtCheck(StopRequest):
    """Asks to stop at its n-th check: the same point on every rank, so a test can aim inside a pass."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.calls, self.n = 0, n

    def local(self) -> str | None:
        self.calls += 1
        return "test stop" if self.calls >= self.n else None


def trainer(
    work: Path, config_name: str, run: str, tp: int, pp: int, *overrides: str, fresh: bool = True
) -> DistillLoop:
    run_dir = work / "runs" / run
    config = load_config(
        work / config_name, [f"run.dir={run_dir}", f"parallel.tp={tp}", f"parallel.pp={pp}", *overrides]
    )
    ctx = init_parallel(tp, pp, seed=config.training.seed)
    if fresh and ctx.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    return build_loop(config, ctx)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main() -> None:
    out, work = sys.argv[1], Path(sys.argv[2])
    found: dict[str, dict] = {}
    fkl = ["loss.weights.ce=0.5", "loss.weights.forward_kl=1.0"]
    for name, config, tp, pp in (
        ("online_tp1pp1", "online.yaml", 1, 1),
        ("online_tp2pp1", "online.yaml", 2, 1),
        ("online_tp1pp2", "online.yaml", 1, 2),
        ("cached_tp1pp1", "cached.yaml", 1, 1),
        ("cached_tp2pp1", "cached.yaml", 2, 1),
        ("cached_tp1pp2", "cached.yaml", 1, 2),
    ):
        found[name] = summary(trainer(work, config, name, tp, pp, *fkl).run())
    # a teacher megatron-core does not map (Gemma 3), live as the HF module under transformers' tp
    gemma = [f"teacher.path={work / 'gemma3'}", *fkl]
    for name, tp in (("gemma_online_tp1pp1", 1), ("gemma_online_tp2pp1", 2)):
        found[name] = summary(trainer(work, "online.yaml", name, tp, 1, *gemma).run())
    # a mixture-of-experts teacher (Qwen3-MoE) live on megatron-core, its experts split over tp
    moe = [f"teacher.path={work / 'qwen3_moe'}", *fkl]
    for name, tp in (("moe_online_tp1pp1", 1), ("moe_online_tp2pp1", 2)):
        found[name] = summary(trainer(work, "online.yaml", name, tp, 1, *moe).run())
    found["sampled_tp2pp1"] = summary(
        trainer(work, "sampled.yaml", "sampled", 2, 1, "loss.weights.forward_kl=1.0").run()
    )
    # every dense divergence and TAID at once, online at tp2 vs tp1 (the fused loss under tp, in training)
    mix = [
        "loss.weights.ce=0.2",
        "loss.weights.reverse_kl=0.3",
        "loss.weights.skew_forward_kl=0.2",
        "loss.weights.skew_reverse_kl=0.2",
        "loss.weights.jsd=0.3",
        "loss.weights.taid=0.5",
        "loss.temperature=2.0",
    ]
    found["mix_tp1pp1"] = summary(trainer(work, "online.yaml", "mix1", 1, 1, *mix).run())
    found["mix_tp2pp1"] = summary(trainer(work, "online.yaml", "mix2", 2, 1, *mix).run())

    # TAID: uninterrupted, then stopped after 2 steps (checkpoint) and resumed at another layout
    taid = ["loss.weights.ce=0.0", "loss.weights.taid=1.0", "training.steps=5"]
    found["taid_online"] = summary(trainer(work, "online.yaml", "taid_full", 1, 1, *taid).run())
    found["taid_cached"] = summary(trainer(work, "cached.yaml", "taid_cached", 2, 1, *taid).run())
    first = trainer(work, "online.yaml", "taid_resume", 1, 1, *taid)
    stopped = [first.train_step(), first.train_step()]
    first.save()
    first.metrics.close()
    resumed = trainer(work, "online.yaml", "taid_resume", 2, 1, *taid, fresh=False).run()
    found["taid_resumed"] = summary(stopped + resumed)

    # DDK: weights from the cached and the live teacher's held-out perplexity, updated every 2 steps;
    # stopped after 3 steps and resumed at another layout: the same samples, weights and losses
    ddk = [
        "data.mixture.type=ddk",
        "data.mixture.interval=2",
        "data.mixture.eval_sequences=2",
        "training.steps=5",
    ]
    for name, config in (("ddk_cached", "cached.yaml"), ("ddk_online", "online.yaml")):
        full = trainer(work, config, name, 1, 1, *fkl, *ddk)
        found[name] = {
            **summary(full.run()),
            "mixture": full.mixture.state_dict(),
            "updates": [
                r for r in _metrics(work / "runs" / name) if any(k.startswith("mixture/") for k in r)
            ],
        }
    first = trainer(work, "cached.yaml", "ddk_resume", 2, 1, *fkl, *ddk)
    stopped = [first.train_step() for _ in range(3)]
    first.save()
    first.metrics.close()
    again = trainer(work, "cached.yaml", "ddk_resume", 1, 2, *fkl, *ddk, fresh=False)
    found["ddk_resumed"] = {**summary(stopped + again.run()), "mixture": again.mixture.state_dict()}

    # a stop inside the DDK pass after step 2 (checks: before step 1, before step 2, then the pass's
    # first domain): step 2 is saved with its DDK update pending, which the resumed run does first
    first = trainer(work, "cached.yaml", "ddk_stop", 1, 1, *fkl, *ddk)
    first.stop = StopAtCheck(3)
    try:
        first.run()
        raise AssertionError("the stop request was not honoured")
    except StopRequested as stop:
        reason = stop.reason
    state = read_training_state(latest_checkpoint(work / "runs" / "ddk_stop" / "checkpoints"))
    again = trainer(work, "cached.yaml", "ddk_stop", 1, 1, *fkl, *ddk, fresh=False)
    found["ddk_stopped_in_pass"] = {
        **summary(again.run()),
        "reason": reason,
        "saved": {"step": state["step"], "pending": state["pending"]},
        "mixture": again.mixture.state_dict(),
    }
    report(out, dist.get_rank(), found)
    shutdown()


if __name__ == "__main__":
    main()
