"""The DeepSpeed ZeRO engine on real gloo processes (see tests/distributed/test_zero_engine.py).

argv: OUT_DIR WORK_DIR. WORK_DIR holds `cached.yaml` (top-k cache with k = V) and `online.yaml` over the
same data, student initialisation and teacher. Launched once with 1 rank and once with 2: each launch
trains ZeRO-2 and ZeRO-3 from the same initial student on the same global batches, cached and online;
the 1-rank launch also trains the megatron engine from the same weights. The ZeRO-3 cached run reports
its logits on a fixed batch (after training, through the engine) for the export check.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distill.config import load_config
from distill.training.loop import DistillLoop
from distill.training.train import build_loop
from parallel.distributed import join_world
from tests.distributed import report

STEPS = 5


def trainer(work: Path, config_name: str, run: str, *overrides: str) -> DistillLoop:
    run_dir = work / "runs" / f"{run}_dp{dist.get_world_size()}"
    config = load_config(work / config_name, [f"run.dir={run_dir}", f"training.steps={STEPS}", *overrides])
    if dist.get_rank() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    return build_loop(config)


def logits_of(loop: DistillLoop, tokens: torch.Tensor) -> list:
    """The engine's own logits `[b, s, V]` for `tokens` (its output layer applied to its hidden states)."""
    out = loop.engine.forward([tokens], lambda i, hidden, weight, labels: hidden.float() @ weight.float().t())
    return out[0].tolist()


def partitioned(loop: DistillLoop) -> bool:
    """Whether every parameter of the ZeRO-3 student is split (this rank holds a part, not the whole)."""
    model = loop.engine.wrapper.model
    return all(p.ds_tensor.numel() < p.ds_numel and p.numel() == 0 for p in model.parameters())


def main() -> None:
    out, work = sys.argv[1], Path(sys.argv[2])
    join_world()
    found: dict[str, object] = {}
    deepspeed = ["engine=deepspeed"]
    for name, config, stage, *extra in (
        ("zero1_cached", "cached.yaml", 1),
        ("zero2_cached", "cached.yaml", 2),
        ("zero3_cached", "cached.yaml", 3),
        ("zero2_online", "online.yaml", 2),
        ("zero3_online", "online.yaml", 3),
        ("zero2_bf16", "cached.yaml", 2, "training.precision=bf16"),
        ("zero3_bf16", "cached.yaml", 3, "training.precision=bf16"),
    ):
        # stage 3 splits every tensor (by default DeepSpeed keeps tensors under 100k elements whole)
        split = ["deepspeed.stage3_param_persistence_threshold=0"] if stage == 3 else []
        loop = trainer(work, config, name, *deepspeed, f"deepspeed.zero_stage={stage}", *split, *extra)
        # AdamW's groups as DeepSpeed kept them (it drops a group left empty)
        found[f"{name}_decay_groups"] = [g["weight_decay"] for g in loop.engine.ds.optimizer.param_groups]
        if stage == 3 and dist.get_world_size() == 2:
            found[f"{name}_partitioned"] = partitioned(loop)
        found[name] = [r.loss for r in loop.run()]
        if name == "zero3_cached":
            domain = loop.data.domains[0]
            rows = [loop.data.sequence(domain, i, "heldout")[:9].astype("int64") for i in (0, 1)]
            tokens = torch.from_numpy(np.stack(rows))  # [2, 9]
            found["zero3_logits"] = logits_of(loop, tokens)
            found["zero3_tokens"] = tokens.tolist()
            found["zero3_checkpoint"] = str(loop.config.checkpoint.dir)
    # TAID's schedule and DDK's reweighting (held-out passes through the engine) ride on the same loop
    taid_ddk = [
        "loss.weights.taid=1.0",
        "data.mixture.type=ddk",
        "data.mixture.interval=2",
        "data.mixture.eval_sequences=2",
    ]
    loop = trainer(work, "cached.yaml", "zero2_taid_ddk", *deepspeed, "deepspeed.zero_stage=2", *taid_ddk)
    results = loop.run()
    found["zero2_taid_ddk"] = [r.loss for r in results]
    found["zero2_taid_ddk_tau"] = [r.tau for r in results]
    found["zero2_taid_ddk_weights"] = loop.mixture.state_dict()["sampler"]["weights"]
    if dist.get_world_size() == 1:
        found["megatron_cached"] = [r.loss for r in trainer(work, "cached.yaml", "megatron").run()]
    report(out, dist.get_rank(), found)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
