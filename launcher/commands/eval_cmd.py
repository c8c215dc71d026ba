"""`distillery eval MODEL... --data PREPARED`: held-out ce, perplexity and bits per byte per domain."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.errors import UserError
from distill.hub import parse_location
from distill.messages import say
from launcher.commands.common import add_quiet_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score models (HF directories or checkpoints of any layout) on prepared held-out data: "
        "cross-entropy, perplexity and bits per UTF-8 byte per domain -> eval.json",
    )
    parser.add_argument(
        "models",
        metavar="[NAME=]MODEL",
        nargs="*",
        help="an HF directory or a checkpoint (step directory or root); NAME labels its column",
    )
    parser.add_argument("--data", required=True, type=Path, help="a prepared data directory (data.dir)")
    parser.add_argument(
        "--teacher",
        type=parse_location,
        default=None,
        help="the teacher (a directory, checkpoint or hf://org/name[@revision]): scored once per prepared "
        "data, kept beside it and reused",
    )
    parser.add_argument("--out", type=Path, default=Path("eval"), help="output directory (default: ./eval)")
    parser.add_argument(
        "--sequences", type=int, default=32, help="held-out sequences per domain (default 32)"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--micro-batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out that holds other files")
    add_quiet_argument(parser)
    parser.set_defaults(handler=_eval)


def _models(args: argparse.Namespace) -> list:
    from distill.eval.run import ModelToEval

    models = [ModelToEval("teacher", args.teacher, reused=True)] if args.teacher else []
    for spec in args.models:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        if not name or not path:
            raise UserError(f"model {spec!r}: expected PATH or NAME=PATH")
        try:
            models.append(ModelToEval(name, parse_location(path)))
        except ValueError as exc:
            raise UserError(f"model {spec!r}: {exc}") from None
    if not models:
        raise UserError("nothing to evaluate: name a model (PATH or NAME=PATH) or --teacher")
    names = [m.name for m in models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"models named more than once: {', '.join(repeated)}; label them NAME=PATH")
    return models


def _eval(args: argparse.Namespace) -> int:
    from distill.eval.run import EvalSettings, evaluate

    if args.sequences <= 0 or args.micro_batch <= 0:
        raise UserError("--sequences and --micro-batch must be positive")
    settings = EvalSettings(args.sequences, args.dtype, args.micro_batch)
    evaluate(
        _models(args),
        args.data,
        args.out,
        settings,
        key="--out",
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    say("eval", f"wrote {args.out / 'eval.json'}")
    return 0
