"""`distillery run CONFIG`: the whole campaign on this machine, skipping stages that are complete."""

from __future__ import annotations

import argparse

from launcher.campaign import STAGES, RunOptions, run_stages
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
    parser.add_argument(
        "--stages",
        type=_stage_names,
        default=[s.name for s in STAGES],
        metavar="NAME,...",
        help="run only these stages (those that apply, in campaign order), e.g. --stages export,eval",
    )
    parser.set_defaults(handler=_run)


def _stage_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in {s.name for s in STAGES}]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {', '.join(unknown) or '(none given)'}; the stages are "
            + ", ".join(s.name for s in STAGES)
        )
    return names


def _run(args: argparse.Namespace) -> int:
    run_stages(config_from(args), args.stages, RunOptions(progress=not args.quiet, nproc=args.nproc))
    return 0
