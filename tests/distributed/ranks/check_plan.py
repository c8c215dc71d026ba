"""The bytes a megatron engine holds after one training step, beside what `distillery plan` says, at three
layouts in one launch of 2 ranks (tp1 x dp2, tp2, pp2).

argv: OUT_DIR WORK_DIR. WORK_DIR holds `config.yaml` (prepared data, a sized student, CE). Each rank
reports per layout its counted weights (the module's parameters), gradients (megatron-core's DDP grad
buffers) and optimizer state (fp32 masters that are not the weights themselves, AdamW's moments), and
the plan's numbers for its pipeline stage; and after the first layout's step its peak RSS above the
post-import one beside the plan's memory total.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch.distributed as dist

from distill.config import load_config
from distill.plan.campaign import plan_campaign
from distill.plan.memory import Layout, megatron_state
from distill.training.train import build_loop
from parallel.distributed import init_parallel, shutdown
from tests.distributed import report

LAYOUTS = ((1, 1), (2, 1), (1, 2))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    out, work = sys.argv[1], Path(sys.argv[2])
    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux: KiB)
    found: dict[str, dict] = {}
    for tp, pp in LAYOUTS:
        config = load_config(
            work / "config.yaml",
            [f"run.dir={work}/run_tp{tp}pp{pp}", f"parallel.tp={tp}", f"parallel.pp={pp}"],
        )
        ctx = init_parallel(tp, pp, seed=config.training.seed)
        loop = build_loop(config, ctx)
        loop.run()  # one step
        engine = loop.engine
        optimizer = engine.optimizer
        weights = list(engine.module.parameters())
        held = {
            "weights": nbytes(weights),
            "gradients": nbytes(b.grad_data for b in engine.ddp.buffers),
            "optimizer": nbytes(
                m for p, m in zip(optimizer.params, optimizer.masters, strict=True) if m is not p
            )
            + nbytes(
                t for state in optimizer.optimizer.state.values() for t in state.values() if t.dim() > 0
            ),
        }
        planned = {
            item.name: item.bytes
            for item in megatron_state(
                engine.arch,
                Layout(tp, pp, ctx.dims.dp),
                bf16=False,
                distributed_optimizer=False,
                stage=ctx.pp_rank,
            )
        }
        found[f"tp{tp}pp{pp}"] = {"held": held, "planned": planned}
        if (tp, pp) == (1, 1):  # the peak RSS only grows: the first layout's is its own
            train = next(s for s in plan_campaign(config, None).stages if s.stage == "train")
            found["rss"] = {
                "above_imports": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - after_imports,
                "planned_total": train.memory_total,
            }
        dist.barrier()
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, found)
    report(out, dist.get_rank(), {"ranks": reports})
    shutdown()


if __name__ == "__main__":
    main()
