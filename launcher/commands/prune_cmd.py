"""`distillery prune CONFIG`: cut the teacher into the student's initial weights (Minitron).

Run as a command it is the campaign's prune stage on this machine: it launches the teacher's ranks for
the importance scores (`--nproc`, default the teacher's tp x pp), then cuts and evaluates in this
process. `--measure` is what each launched rank runs (or what a Slurm job's ranks run).
"""

from __future__ import annotations

import argparse

from distill.errors import UserError
from launcher.commands.common import (
    add_config_arguments,
    add_overwrite_argument,
    add_quiet_argument,
    config_from,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune the teacher into student.arch (importance on calibration data, then the cut) as the "
        "student's initial weights",
    )
    add_config_arguments(parser)
    add_overwrite_argument(parser)
    add_quiet_argument(parser)
    parser.add_argument(
        "--nproc", type=int, default=None, help="ranks measuring the importance (default teacher tp x pp)"
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="only measure the importance scores, as one rank of the teacher's world (under "
        "`distillery launch` or torchrun)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    config = config_from(args)
    if args.measure:
        from distill.prune.stage import measure_importance  # torch + megatron-core: only when used

        measure_importance(config)
        return 0
    from launcher.campaign import RunOptions, run_stages

    if config.prune is None:
        raise UserError(f"{args.config}: no `prune` section (method, calibration_sequences, dir)")
    run_stages(
        config, ["prune"], RunOptions(progress=not args.quiet, nproc=args.nproc, overwrite=args.overwrite)
    )
    return 0
