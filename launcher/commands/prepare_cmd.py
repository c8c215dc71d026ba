"""`distillery prepare CONFIG [--part I/N]`: tokenize and pack the campaign's domains (resumable);
with `--part`, one task of a job array encodes its share, and a run without `--part` packs."""

from __future__ import annotations

import argparse

from distill.data.prepare.run import prepare
from launcher.commands.common import (
    add_config_arguments,
    add_overwrite_argument,
    add_part_argument,
    add_quiet_argument,
    config_from,
)

DESCRIPTION = """\
Stream each domain's documents, tokenize them and pack them into `train` and `heldout` token stores
in data.dir, with a manifest (resumable; skipped when complete).

As a job array: `prepare CONFIG --part I/N` in each of N tasks (e.g. I = $SLURM_ARRAY_TASK_ID) reads
and tokenizes a disjoint share of the input files into data.dir/.parts/ (resumable file by file); then
`prepare CONFIG` without --part packs them (encoding any share still missing) into exactly the bytes
that a single `prepare CONFIG` writes."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="stream, tokenize and pack each domain into token stores (--part I/N: one task of a job "
        "array; then run without --part to pack)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    add_overwrite_argument(parser)
    add_quiet_argument(parser)
    add_part_argument(
        parser,
        "encode only part I of N (0 <= I < N; a job array task) into data.dir/.parts/; a later "
        "`prepare CONFIG` without --part packs all parts",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.part is not None:
        from distill.data.prepare.parts import prepare_part

        index, count = args.part
        prepare_part(config_from(args), index, count, not args.quiet, overwrite=args.overwrite)
        return 0
    prepare(config_from(args), overwrite=args.overwrite, progress=not args.quiet)
    return 0
