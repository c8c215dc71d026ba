"""`distillery submit CONFIG`: the campaign as chained Slurm jobs; `status RUN_DIR`; `cancel RUN_DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.errors import UserError
from distill.messages import say
from launcher.commands.common import add_config_arguments, config_from


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser(
        "submit",
        help="write sbatch scripts into RUN_DIR/slurm/ and submit the stages chained with afterok "
        "(complete stages and our queued or running jobs are not submitted again)",
    )
    add_config_arguments(submit)
    submit.add_argument(
        "--dry-run", action="store_true", help="print the scripts and the sbatch lines, submit nothing"
    )
    submit.add_argument(
        "--gpu", default=None, help="the nodes' GPU for the plan that runs first (default slurm.gpu)"
    )
    submit.add_argument(
        "--force", action="store_true", help="submit even a stage the plan says does not fit the GPU's memory"
    )
    submit.set_defaults(handler=_submit)
    status = subparsers.add_parser(
        "status",
        help="each Slurm job of a submitted campaign: id, Slurm state, whether its stage is complete",
    )
    status.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    status.set_defaults(handler=_status)
    cancel = subparsers.add_parser("cancel", help="cancel a submitted campaign's queued and running jobs")
    cancel.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    cancel.set_defaults(handler=_cancel)


def _submit(args: argparse.Namespace) -> int:
    from launcher.slurm.submit import submit

    config = config_from(args)
    _plan_first(config, args.gpu, force=args.force)
    submit(config, dry_run=args.dry_run)
    return 0


def _plan_first(config: object, gpu_name: str | None, *, force: bool) -> None:
    """With a GPU known, a stage whose memory per GPU does not fit is refused (exit 2) unless `force`;
    without one only disk and time are planned, and nothing is refused."""
    from distill.plan.campaign import HEADROOM, plan_campaign
    from distill.plan.render import gib
    from launcher.commands.plan_cmd import gpu_of

    gpu = gpu_of(gpu_name, config)
    plan = plan_campaign(config, gpu)  # type: ignore[arg-type]
    for stage in plan.stages:
        if stage.fits is not None:
            say(
                "plan",
                f"{stage.stage}: {gib(stage.memory_total)} per GPU of {gib(gpu.memory_bytes * HEADROOM)} usable",
            )
    refused = plan.refusals()
    if not refused:
        return
    problems = "; ".join(
        f"stage {stage.stage} needs {gib(stage.memory_total)} per {gpu.name}, most of it {stage.largest().name} "
        f"({gib(stage.largest().bytes)}): {stage.advice}"
        for stage in refused
    )
    if force:
        say("plan", f"warning (--force): {problems}")
        return
    raise UserError(
        f"submit: the plan says it will not fit: {problems}; change the config or pass --force (`distillery plan` shows every item)"
    )


def _status(args: argparse.Namespace) -> int:
    from launcher.slurm.submit import format_status, status

    print(format_status(status(args.run_dir.resolve())))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from launcher.slurm.submit import cancel

    ids = cancel(args.run_dir.resolve())
    say("cancel", ", ".join(ids) if ids else "no queued or running job")
    return 0
