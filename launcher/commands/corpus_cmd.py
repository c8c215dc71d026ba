"""`distillery corpus demo OUT_DIR`: assemble the multi-domain demo corpus from this machine's files."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.data.corpus.build import DEMO_DOMAINS, DemoCorpusSpec, build_demo_corpus


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("corpus", help="build a corpus")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    demo = actions.add_parser(
        "demo",
        help="real text from this machine: Python stdlib (code), licenses (legal), man pages (docs, multilingual)",
    )
    demo.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    defaults = DemoCorpusSpec()
    demo.add_argument(
        "--domains",
        default=",".join(DEMO_DOMAINS),
        help=f"comma-separated subset of {','.join(DEMO_DOMAINS)}",
    )
    demo.add_argument("--max-bytes-per-domain", type=int, default=defaults.max_bytes_per_domain)
    demo.add_argument("--max-doc-chars", type=int, default=defaults.max_doc_chars)
    demo.add_argument("--overwrite", action="store_true", help="replace a corpus built with other settings")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    spec = DemoCorpusSpec(
        domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()),
        max_bytes_per_domain=args.max_bytes_per_domain,
        max_doc_chars=args.max_doc_chars,
    )
    manifest = build_demo_corpus(args.out_dir, spec, overwrite=args.overwrite, progress=not args.quiet)
    for name, info in manifest["domains"].items():
        print(f"{name:>14}: {info['documents']:6d} documents, {info['bytes']:>10,} bytes")
    for missing in manifest.get("missing", []):
        print(f"{'missing':>14}: {missing}")
    return 0
