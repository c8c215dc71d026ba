"""AdamW on megatron-core DDP gradients, the model-parallel grad norm, clipping (the schedule: `schedule.py`).

megatron-core's own optimizer wrappers assert CUDA tensors, so the optimizer step is ours: a plain
`torch.optim.AdamW` over fp32 parameters. With a bf16 model it keeps fp32 master copies (the model's
bf16 weights are refreshed from them after each step), which is the standard mixed-precision recipe.
Gradients come from the DDP grad buffers (`param.main_grad`, fp32, already reduced over data
parallel). The grad norm counts every weight once: tensor-parallel duplicates (norms) only on tp
rank 0, the last stage's copy of tied embeddings not at all, then a sum over the model-parallel group.
Optimizer state is saved as sharded tensors keyed like the parameters, so it reshards with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from distill.config.schema import TrainingConfig
from distill.engine.schedule import adamw_param_groups, lr_at


class DistillOptimizer:
    """AdamW with optional fp32 masters; `step()` consumes `main_grad`s and returns the grad norm."""

    kind = "adamw"  # recorded in checkpoints: a run resumes with the optimizer it was saved with

    def __init__(
        self, model: torch.nn.Module, cfg: TrainingConfig, *, mp_group: dist.ProcessGroup, tp_rank: int
    ) -> None:
        self.cfg = cfg
        self.mp_group = mp_group
        self.tp_rank = tp_rank
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        names = {id(p): n for n, p in model.named_parameters()}
        groups = adamw_param_groups(
            ((names[id(p)], m) for p, m in zip(self.params, self.masters, strict=True)), cfg
        )
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self._order = groups[0]["params"] + groups[1]["params"]  # the optimizer's order, for sharded state
        self._model_of = {id(m): p for p, m in zip(self.params, self.masters, strict=True)}

    def reload_model_params(self) -> None:
        """Refresh the fp32 masters from the model's weights, after those were loaded (a fresh start from
        `load_weights`): the masters are what the first step updates and copies back into the model."""
        with torch.no_grad():
            for param, master in zip(self.params, self.masters, strict=True):
                if param is not master:
                    master.copy_(param)

    def _counted(self, param: torch.Tensor) -> bool:
        """Whether this rank's grad of `param` enters the global norm (each weight exactly once)."""
        if getattr(param, "shared", False):
            return False  # the last stage's copy of tied embeddings mirrors the first stage's
        return bool(getattr(param, "tensor_model_parallel", False)) or self.tp_rank == 0

    def grad_norm(self) -> float:
        squares = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        for param in self.params:
            if self._counted(param):
                squares += param.main_grad.double().pow(2).sum()
        dist.all_reduce(squares, group=self.mp_group)
        return math.sqrt(squares.item())

    def step(self, step: int) -> tuple[float, float]:
        """Clip, set the LR for `step`, update; returns (grad norm before clipping, lr)."""
        norm = self.grad_norm()
        scale = 1.0
        if self.cfg.grad_clip and norm > self.cfg.grad_clip:
            scale = self.cfg.grad_clip / (norm + 1e-6)
        for param, master in zip(self.params, self.masters, strict=True):
            master.grad = param.main_grad.float() * scale if scale != 1.0 else param.main_grad.float()
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for param, master in zip(self.params, self.masters, strict=True):
                master.grad = None
                if param is not master:
                    param.copy_(master)
        return norm, lr

    # --- sharded state (see distill/checkpoint.py) -------------------------------------------

    def _init_state(self) -> None:
        """Create zero state for every parameter so a sharded template exists before loading."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _model_params_in_order(self) -> Iterator[torch.Tensor]:
        return (self._model_of[id(m)] for m in self._order)

    def sharded_state_dict(self, model_sharded: dict[str, Any], is_loading: bool = False) -> dict[str, Any]:
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            make_sharded_optimizer_tensor,
            optim_state_to_sharding_state,
        )

        if is_loading:
            self._init_state()
        state = self.optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded, self._model_params_in_order())
        steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        state["common_step"] = steps.pop() if steps else 0.0
        masters = {
            i: make_sharded_optimizer_tensor(id_map[i], master, prefix="optimizer.master")
            for i, master in enumerate(self._order)
            if self._model_of[id(master)] is not master
        }
        if masters:
            state["masters"] = masters
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

        step = float(state.pop("common_step"))
        masters = state.pop("masters", {})
        for group in state["param_groups"]:
            if isinstance(group["params"], LocalNonpersistentObject):
                group["params"] = group["params"].unwrap()
        for param_state in state["state"].values():
            param_state["step"] = torch.tensor(step, dtype=torch.float32)
        self.optimizer.load_state_dict(state)
        with torch.no_grad():
            for i, master in enumerate(self._order):
                if i in masters:
                    master.copy_(masters[i])
                    self._model_of[id(master)].copy_(master)
