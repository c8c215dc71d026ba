"""`distillery cache CONFIG` writes the teacher cache; `cache verify DIR` and `cache inspect DIR` check it.

argparse cannot tell a CONFIG from the words `verify`/`inspect` in the same position, so `cache` takes
its arguments whole and hands them to one of three small parsers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill.errors import DataError
from distill.messages import say
from launcher.commands.common import (
    add_config_arguments,
    add_overwrite_argument,
    add_part_argument,
    config_from,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="`cache CONFIG`: run the teacher over the prepared data into a top-k or sampled logit cache "
        "(several ranks: `distillery launch --nproc N -- cache CONFIG`); `cache verify DIR`; `cache inspect DIR`",
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", dest="show_help", help="show the three usages")
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=_dispatch)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    build = argparse.ArgumentParser(prog="distillery cache", description="Write the teacher logit cache.")
    add_config_arguments(build)
    add_overwrite_argument(build)
    add_part_argument(
        build,
        "write only part I of N of the shards (0 <= I < N; a job array task); the last part to finish "
        "writes the manifest, and the cache equals a 1-part run's byte for byte",
    )
    verify = argparse.ArgumentParser(prog="distillery cache verify", description="Check a cache's shards.")
    verify.add_argument("directory", type=Path)
    inspect = argparse.ArgumentParser(prog="distillery cache inspect", description="Statistics of a cache.")
    inspect.add_argument("directory", type=Path)
    inspect.add_argument("--sequences", type=int, default=8, help="sequences compared with the dense teacher")
    return {"build": build, "verify": verify, "inspect": inspect}


def _dispatch(args: argparse.Namespace) -> int:
    words = list(args.arguments)
    parsers = _parsers()
    action = words[0] if words and words[0] in ("verify", "inspect") else "build"
    if args.show_help or not words:
        for parser in parsers.values():
            parser.print_help()
            print()
        return 0 if args.show_help else 2
    options = parsers[action].parse_args(words[1:] if action != "build" else words)
    if action == "verify":
        return _verify(options.directory)
    if action == "inspect":
        from distill.cache.inspect import inspect_cache

        print(json.dumps(inspect_cache(options.directory, sequences=options.sequences), indent=2))
        return 0
    from distill.cache.writer import build_cache  # torch + megatron-core: imported only when used

    part = options.part or (0, 1)
    if part[1] > 1 and options.overwrite:
        raise DataError("--overwrite cannot be combined with --part: the other parts write there too")
    build_cache(config_from(options), overwrite=options.overwrite, part=part)
    return 0


def _verify(directory: Path) -> int:
    from distill.cache.reader import read_cache_manifest, shard_checksum_errors

    manifest = read_cache_manifest(directory)
    errors = shard_checksum_errors(directory, manifest["shards"])
    if errors:
        raise DataError(f"cache {directory} failed verification:\n" + "\n".join(f"  {e}" for e in errors))
    say(f"cache {directory}", f"{len(manifest['shards'])} shards complete, checksums match")
    return 0
