"""`distillery launch --nproc N -- SUBCOMMAND ...`: start N local ranks of a subcommand with torchrun."""

from __future__ import annotations

import argparse

from launcher.local import launch_local


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="run a subcommand on N processes per node (torch's elastic agent, as torchrun), e.g. -- train CONFIG",
    )
    parser.add_argument("--nproc", type=int, required=True, help="processes (ranks) on this machine")
    parser.add_argument(
        "--nnodes", type=int, default=1, help="machines, each running this same command (one per node)"
    )
    parser.add_argument(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="c10d rendezvous on the first node, reachable from every node (needed with --nnodes > 1)",
    )
    parser.add_argument("--rdzv-id", metavar="ID", help="the same on every node, unique per job (a job id)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SUBCOMMAND [ARGS...]")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    launch_local(
        args.nproc, command, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id
    )
    return 0
