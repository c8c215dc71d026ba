"""`distillery submit CONFIG`: the campaign as chained Slurm jobs; `status RUN_DIR`; `cancel RUN_DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

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

    submit(config_from(args), dry_run=args.dry_run)
    return 0


def _status(args: argparse.Namespace) -> int:
    from launcher.slurm.submit import format_status, status

    print(format_status(status(args.run_dir.resolve())))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from launcher.slurm.submit import cancel

    ids = cancel(args.run_dir.resolve())
    say("cancel", ", ".join(ids) if ids else "no queued or running job")
    return 0
