"""A real, deterministic, multi-domain demo corpus built from files every Debian machine already has.

Why: a fresh machine must be able to run a whole campaign without downloading a data set, and the
first stage needs text from several distinct domains so that per-domain metrics mean something. The
Python standard library gives `code`, Debian copyright files and common licenses give `legal`,
English man pages (plus the Python HTML docs when installed) give `docs`, and translated man pages
give `multilingual`. Nothing is faked: a source that is absent is reported and skipped.

Determinism: candidates are ordered by the SHA-1 of their path relative to their root (a stable
pseudo-shuffle, so a capped sample is varied rather than alphabetically first), then taken whole
until the per-domain byte cap; the same machine files therefore give byte-identical output. Man
pages are rendered only as they are needed, because rendering all ~17k of them takes minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from distill.atomic import atomic_directory, atomic_write_json, read_json
from distill.config.data import DEMO_DOMAINS
from distill.data.corpus.text import load_document, split_text
from distill.errors import DataError, UserError
from distill.messages import say
from distill.stage import StageOutput, Status

MANIFEST = "manifest.json"
PART_BYTES = 1_000_000  # rotate part files at this many bytes of text so that no file is huge
GROFF_MISSING = "groff not installed (apt-get install groff-base)"
_SKIP_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})
_SECTION = re.compile(r"man[1-9]")


@dataclass(frozen=True)
class DemoRoots:
    """Where each source lives; tests point these at temporary directories."""

    stdlib: Path
    doc: Path
    licenses: Path
    man: Path
    python_doc: Path

    @classmethod
    def system(cls) -> DemoRoots:
        """The locations on this machine (python_doc follows the running interpreter's version)."""
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        return cls(
            stdlib=Path(sysconfig.get_paths()["stdlib"]),
            doc=Path("/usr/share/doc"),
            licenses=Path("/usr/share/common-licenses"),
            man=Path("/usr/share/man"),
            python_doc=Path(f"/usr/share/doc/python{ver}-doc/html"),
        )


@dataclass(frozen=True)
class DemoCorpusSpec:
    """What to build; two builds with equal specs (and equal machine files) are byte-identical."""

    domains: tuple[str, ...] = DEMO_DOMAINS
    max_bytes_per_domain: int = 4_000_000  # cap on UTF-8 bytes of document text per domain
    max_doc_chars: int = 16_000  # longer texts are split into several documents at line boundaries

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))  # a list from YAML/CLI stays hashable

    def to_json(self) -> dict:
        return {
            "domains": list(self.domains),
            "max_bytes_per_domain": self.max_bytes_per_domain,
            "max_doc_chars": self.max_doc_chars,
        }


@dataclass(frozen=True)
class _Candidate:
    root: Path
    rel: str
    kind: str  # "text", "man" or "html": how the file becomes text
    source: int  # index into the domain's source list
    lang: str = "en"


@dataclass
class _Source:
    root: Path
    pattern: str
    candidates: list[_Candidate] = field(default_factory=list)
    reason: str | None = None  # set when the source is missing
    optional: bool = False  # missing optional sources are recorded but not warned about

    def to_json(self) -> dict:
        out = {
            "root": str(self.root),
            "pattern": self.pattern,
            "status": "missing" if self.reason else "used",
        }
        return {**out, "reason": self.reason} if self.reason else {**out, "candidates": len(self.candidates)}


def read_corpus_manifest(out_dir: Path) -> dict | None:
    """The manifest of the complete corpus in `out_dir`, or None if there is none (or it is unreadable)."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "spec" in manifest else None


def build_demo_corpus(
    out_dir: Path,
    spec: DemoCorpusSpec = DemoCorpusSpec(),
    *,
    roots: DemoRoots | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build the corpus into `out_dir` atomically; returns the manifest (also in out_dir/manifest.json).

    An existing corpus with the same spec is returned as is (resuming a campaign is a no-op); one
    with another spec, or any other non-empty directory, is replaced only with `overwrite`.
    """
    _check_spec(spec)
    out_dir, roots = Path(out_dir), roots or DemoRoots.system()
    output = StageOutput("demo corpus", out_dir, "corpus directory", spec.to_json(), record=MANIFEST)
    if output.check(overwrite=overwrite) is Status.COMPLETE:
        say("corpus", f"{out_dir} is complete, nothing to do")
        return read_json(out_dir / MANIFEST)
    groff = _groff_path()
    seen: set[str] = set()  # sha256 of every document so far: deduplication spans the whole corpus
    manifest: dict[str, Any] = {"format": "distillery.demo_corpus/1", "spec": spec.to_json()}
    manifest.update(roots={k: str(v) for k, v in asdict(roots).items()}, domains={}, missing=[], taken={})
    with atomic_directory(out_dir, overwrite=overwrite or out_dir.exists()) as tmp:
        for domain in spec.domains:
            sources = _gather(domain, roots, groff)
            for s in sources:
                if s.reason and not s.optional:
                    warnings.warn(
                        f"demo corpus {domain}: {s.root}/{s.pattern} skipped: {s.reason}", stacklevel=2
                    )
            stats, taken = _build_domain(tmp / domain, domain, sources, spec, groff, seen, progress)
            manifest["domains"][domain], manifest["taken"][domain] = stats, taken
            if not stats["documents"]:
                reasons = [f"{s.root}/{s.pattern}: {s.reason}" for s in sources if s.reason]
                reason = "; ".join(reasons) if reasons else "every candidate file was rejected or a duplicate"
                manifest["missing"].append({"domain": domain, "reason": reason})
        if len(manifest["missing"]) == len(spec.domains):
            lines = "\n".join(f"  {m['domain']}: {m['reason']}" for m in manifest["missing"])
            raise DataError(f"the demo corpus would be empty; no domain has a usable source:\n{lines}")
        manifest["total_documents"] = sum(d["documents"] for d in manifest["domains"].values())
        manifest["total_bytes"] = sum(d["bytes"] for d in manifest["domains"].values())
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def _check_spec(spec: DemoCorpusSpec) -> None:
    unknown = [d for d in spec.domains if d not in DEMO_DOMAINS]
    if unknown:
        raise UserError(f"unknown demo corpus domain(s) {unknown}; valid domains are {list(DEMO_DOMAINS)}")
    if not spec.domains or len(set(spec.domains)) != len(spec.domains):
        raise UserError(f"demo corpus domains must be non-empty and distinct, got {list(spec.domains)}")
    if spec.max_bytes_per_domain <= 0 or spec.max_doc_chars <= 0:
        raise UserError("demo corpus max_bytes_per_domain and max_doc_chars must be positive")


def _groff_path() -> str | None:
    return shutil.which("groff")


def _gather(domain: str, roots: DemoRoots, groff: str | None) -> list[_Source]:
    """The domain's sources, each with its candidate files or the reason it is missing."""
    if domain == "code":
        sources = [_Source(roots.stdlib, "**/*.py")]
        _fill(sources[0], 0, "text", _walk_py(roots.stdlib))
    elif domain == "legal":
        sources = [_Source(roots.doc, "*/copyright"), _Source(roots.licenses, "*")]
        _fill(sources[0], 0, "text", lambda: (p for p in roots.doc.glob("*/copyright") if p.is_file()))
        _fill(sources[1], 1, "text", lambda: (p for p in roots.licenses.iterdir() if p.is_file()))
    elif domain == "docs":
        sources = [
            _Source(roots.man, "man[1-9]/*"),
            _Source(roots.python_doc, "**/*.txt|**/*.html", optional=True),
        ]
        _fill(sources[0], 0, "man", lambda: _man_pages(roots.man), needs=groff)
        _fill(sources[1], 1, "html", lambda: _python_docs(roots.python_doc))
    else:  # multilingual: every <lang> directory next to man1..man9
        sources = [_Source(roots.man, "<lang>/man[1-9]/*")]
        _fill(sources[0], 0, "man", lambda: _translated_man_pages(roots.man), needs=groff)
    return sources


def _fill(
    source: _Source, index: int, kind: str, files: Callable[[], Iterable[Path]], needs: str | None = ""
) -> None:
    """List the source's files into `source.candidates`, or say why it is missing (`needs`: groff path)."""
    if not source.root.is_dir():
        source.reason = "directory does not exist"
        return
    if needs is None:
        source.reason = GROFF_MISSING
        return
    for path in files():
        rel = path.relative_to(source.root).as_posix()
        lang = re.split(r"[.@]", rel.split("/")[0])[0] if source.pattern.startswith("<lang>") else "en"
        kind_ = "text" if kind == "html" and path.suffix == ".txt" else kind
        source.candidates.append(_Candidate(source.root, rel, kind_, index, lang))
    if not source.candidates:
        source.reason = "no matching files"


def _walk_py(root: Path) -> Callable[[], Iterator[Path]]:
    def walk() -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            yield from (Path(dirpath, f) for f in filenames if f.endswith(".py"))

    return walk


def _man_pages(man: Path) -> Iterator[Path]:
    """Regular files in man[1-9]/; symlinks are aliases of pages that are already there."""
    for section in man.iterdir():
        if _SECTION.fullmatch(section.name) and section.is_dir():
            yield from (p for p in section.iterdir() if p.is_file() and not p.is_symlink())


def _translated_man_pages(man: Path) -> Iterator[Path]:
    for lang in man.iterdir():
        if lang.is_dir() and not re.match(r"man\d", lang.name):
            yield from _man_pages(lang)


def _python_docs(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.suffix in (".txt", ".html") and p.is_file())


def _order(sources: list[_Source]) -> list[_Candidate]:
    """Sort by SHA-1 of the relative path: stable across runs and machines, but not alphabetical, so
    that a capped sample spans many packages instead of the first letters of the alphabet."""
    cands = [c for s in sources for c in s.candidates]
    return sorted(cands, key=lambda c: (hashlib.sha1(c.rel.encode()).hexdigest(), c.rel, c.source))


def _ordered_map(fn: Callable, items: list, workers: int) -> Iterator[tuple[Any, Any]]:
    """`(item, fn(item))` in input order, computing a few items ahead on threads (groff is a subprocess)."""
    with ThreadPoolExecutor(workers) as pool:
        window: deque = deque()
        it = iter(items)
        try:
            for item in it:
                window.append((item, pool.submit(fn, item)))
                if len(window) >= 2 * workers:
                    item0, fut = window.popleft()
                    yield item0, fut.result()
            while window:
                item0, fut = window.popleft()
                yield item0, fut.result()
        finally:
            pool.shutdown(cancel_futures=True)


class _PartWriter:
    """JSONL parts `part-00000.jsonl`, ...; the domain directory is created on the first document."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.parts, self.bytes = directory, [], 0
        self.file: IO[bytes] | None = None

    def write(self, record: dict, nbytes: int) -> None:
        if self.file is None or self.bytes >= PART_BYTES:
            self.close()
            self.directory.mkdir(parents=True, exist_ok=True)
            self.parts.append(f"part-{len(self.parts):05d}.jsonl")
            self.file, self.bytes = open(self.directory / self.parts[-1], "wb"), 0
        self.file.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self.bytes += nbytes

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


def _build_domain(
    directory: Path,
    domain: str,
    sources: list[_Source],
    spec: DemoCorpusSpec,
    groff: str | None,
    seen: set[str],
    progress: bool,
) -> tuple[dict, list[dict]]:
    """Take whole documents in order until the byte cap; returns (stats, taken)."""
    stats = {"documents": 0, "bytes": 0, "files_used": 0, "duplicates_skipped": 0, "rejected": 0}
    taken: list[dict] = []
    writer = _PartWriter(directory)
    workers = max(1, min(4, os.cpu_count() or 1))
    bar = tqdm(
        total=spec.max_bytes_per_domain,
        desc=f"corpus {domain}",
        unit="B",
        unit_scale=True,
        disable=not progress,
    )
    results = _ordered_map(lambda c: load_document(c.root / c.rel, c.kind, groff), _order(sources), workers)
    try:
        with closing(results):
            for cand, (status, text, digest) in results:
                if status == "skip":
                    continue
                if status == "reject" or not text.strip() or text.count("\ufffd") > 0.01 * len(text):
                    stats["rejected"] += 1
                    continue
                used = full = False
                for piece in split_text(text, spec.max_doc_chars):
                    if not piece.strip():
                        continue
                    data = piece.encode("utf-8")
                    key = hashlib.sha256(data).hexdigest()
                    if key in seen:
                        stats["duplicates_skipped"] += 1
                        continue
                    if stats["bytes"] + len(data) > spec.max_bytes_per_domain:
                        full = True
                        break
                    seen.add(key)
                    source = os.path.join(os.path.abspath(cand.root), cand.rel)
                    writer.write(
                        {"text": piece, "source": source, "domain": domain, "lang": cand.lang}, len(data)
                    )
                    stats["documents"] += 1
                    stats["bytes"] += len(data)
                    bar.update(len(data))
                    used = True
                if used:
                    stats["files_used"] += 1
                    taken.append({"root": str(cand.root), "path": cand.rel, "sha256": digest})
                if full:
                    break
    finally:
        writer.close()
        bar.close()
    stats["sources"] = [s.to_json() for s in sources]
    stats["parts"] = writer.parts
    return stats, taken
