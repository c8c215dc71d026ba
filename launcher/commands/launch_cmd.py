"""`distillery launch --nproc N -- SUBCOMMAND ...`: start N local ranks of a subcommand with torchrun."""

from __future__ import annotations

import argparse

from launcher.local import launch_local


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch", help="run a subcommand on N local processes (torchrun --standalone), e.g. -- train CONFIG"
    )
    parser.add_argument("--nproc", type=int, required=True, help="processes (ranks) on this machine")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SUBCOMMAND [ARGS...]")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    launch_local(args.nproc, command)
    return 0
