"""`distillery import HF_DIR OUT` and `distillery export CKPT OUT`: HF <-> sharded training checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.hub import parse_location
from distill.messages import say


def register(subparsers: argparse._SubParsersAction) -> None:
    imp = subparsers.add_parser(
        "import",
        help="convert a HF Llama/Mistral/Qwen2/Qwen3 directory or hub id (hf://org/name[@revision]) into a "
        "sharded training checkpoint "
        "(run with tp x pp processes: `distillery launch --nproc 4 -- import ... --tp 2 --pp 2`)",
    )
    imp.add_argument("hf_dir", metavar="HF_DIR", type=parse_location)
    imp.add_argument(
        "out", metavar="OUT", type=Path, help="checkpoint root (gets step_00000000 and `latest`)"
    )
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks reading the weights")
    imp.add_argument("--pp", type=int, default=1, help="pipeline stages reading the weights")
    imp.set_defaults(handler=_import)

    exp = subparsers.add_parser("export", help="write a checkpoint of any layout as a HF model directory")
    exp.add_argument(
        "checkpoint", metavar="CKPT", type=Path, help="a checkpoint directory, or a root (its latest)"
    )
    exp.add_argument("out", metavar="OUT", type=Path)
    exp.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    exp.set_defaults(handler=_export)


def _import(args: argparse.Namespace) -> int:
    from distill.engine.megatron.convert import import_hf  # torch + megatron-core: imported only when used

    path = import_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp)
    say("import", f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from distill.engine.megatron.convert import export_hf

    path = export_hf(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    say("export", f"wrote {path}")
    return 0
