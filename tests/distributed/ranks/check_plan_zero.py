"""The bytes a DeepSpeed ZeRO-3 engine holds after one training step on 2 ranks, beside the plan's.

argv: OUT_DIR WORK_DIR (`config.yaml` as for `check_plan.py`; engine deepspeed, ZeRO-3 set here). Each rank
reports its parameter partitions (`ds_tensor`), its gradient partition buffer, and its optimizer state
(fp32 flat master partitions, AdamW's moments), and the plan's numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from distill.config import load_config
from distill.plan.memory import zero_state
from distill.training.train import build_loop
from tests.distributed import report


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    out, work = sys.argv[1], Path(sys.argv[2])
    config = load_config(
        work / "config.yaml", [f"run.dir={work}/run_zero3", "engine=deepspeed", "deepspeed.zero_stage=3"]
    )
    loop = build_loop(config)
    loop.run()  # one step
    engine = loop.engine
    zero = engine.ds.optimizer
    held = {
        "weights": nbytes(p.ds_tensor for p in engine.ds.module.parameters()),
        "gradients": nbytes([zero.grad_partitions_flat_buffer]),
        "optimizer": nbytes(zero.fp32_partitioned_groups_flat)
        + nbytes(t for state in zero.optimizer.state.values() for t in state.values() if t.dim() > 0),
    }
    planned = {
        item.name: item.bytes
        for item in zero_state(engine.arch, dist.get_world_size(), bf16=False, zero_stage=3)
    }
    report(out, dist.get_rank(), {"held": held, "planned": planned})
    engine.close()


if __name__ == "__main__":
    main()
