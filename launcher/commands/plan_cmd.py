"""`distillery plan CONFIG`: what a campaign will cost before it is submitted (docs/plan.md)."""

from __future__ import annotations

import argparse
import json

from distill.errors import UserError
from launcher.commands.common import add_config_arguments, config_from


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="per stage: memory per GPU (against the GPU), disk, time and GPU-hours, Slurm shape; nothing runs",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--gpu", default=None, help="the GPU to plan for (H100, H200, A100 40GB, ...; default slurm.gpu)"
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="training tokens (default steps x batch x seq_len)"
    )
    parser.add_argument("--json", action="store_true", help="the plan as JSON")
    parser.set_defaults(handler=_run)


def gpu_of(name: str | None, config: object) -> object:
    """The GPU named on the command line, else by `slurm.gpu`, else None; an unknown name is an error."""
    from distill.gpus import GPUS, find_gpu

    name = name or (getattr(getattr(config, "slurm", None), "gpu", None))
    if name is None:
        return None
    gpu = find_gpu(name)
    if gpu is None:
        raise UserError(f"GPU {name!r} is not in the table ({', '.join(GPUS)})")
    return gpu


def _run(args: argparse.Namespace) -> int:
    from distill.plan.campaign import plan_campaign
    from distill.plan.render import render

    config = config_from(args)
    plan = plan_campaign(config, gpu_of(args.gpu, config), args.tokens)
    print(json.dumps(plan.to_json(), indent=2) if args.json else render(plan))
    return 2 if plan.refusals() else 0
