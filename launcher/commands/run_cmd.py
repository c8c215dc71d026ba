"""`distillery run CONFIG`: the whole campaign on this machine, skipping stages that are complete."""

from __future__ import annotations

import argparse

from launcher.campaign import STAGES, RunOptions, run_campaign
from launcher.commands.common import add_config_arguments, add_quiet_argument, config_from


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help=f"run a campaign's stages in order ({' -> '.join(s.name for s in STAGES)}), skipping complete ones",
    )
    add_config_arguments(parser)
    add_quiet_argument(parser)
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks of the multi-process stages (default: run.nproc, else parallel.tp x parallel.pp)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    run_campaign(config_from(args), RunOptions(progress=not args.quiet, nproc=args.nproc))
    return 0
