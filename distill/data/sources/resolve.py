"""Sources: one config `SourceConfig` -> its files (or `datasets` stream), its identity, its documents.

Local globs are expanded and sorted here, so the document order, and with it every byte of the prepared
output, depends only on the files' contents. A source's *identity* (what prepare's spec records) is
where-independent: each file's name relative to its glob's fixed directory, size and SHA-256, so a corpus
moved or mounted elsewhere is recognised as the same input. Hashes are remembered by path, size and
mtime (`known`), so a re-run over files that did not move reads none of them.
Documents come from `open_documents` (local files: `readers.py`, which names and counts bad records;
`dataset:` sources stream through HF `datasets` with `streaming=True`, whose `state_dict()` resumes).
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from distill.config.schema import SourceConfig
from distill.data.sources.readers import DatasetDocuments, FileDocuments, ParquetDocuments
from distill.data.sources.records import RecordPolicy
from distill.errors import DataError

_FORMAT_BY_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
    ".md": "text",
}


@dataclass(frozen=True)
class ResolvedSource:
    key: str  # config key path, for error messages: data.domains.code.sources[0]
    config: SourceConfig
    files: tuple[str, ...]  # expanded local files, sorted; empty for `dataset` sources
    builder: str  # load_dataset's first argument
    names: tuple[str, ...] = ()  # each file relative to its glob's fixed directory (location-free)

    def describe(self, known: dict[str, list[Any]] | None = None) -> dict[str, Any]:
        """What identifies this source's content (no absolute path): files by relative name, size and
        sha256 (hashed unless `known[path] == [size, mtime_ns, sha256]` still holds), or the dataset."""
        c = self.config
        if self.files:
            files = [
                {"name": name, "bytes": os.path.getsize(path), "sha256": file_sha256(path, known)}
                for path, name in zip(self.files, self.names, strict=True)
            ]
            return {"files": files, "format": self.builder, "text_field": c.text_field}
        return {
            "dataset": c.dataset,
            "name": c.name,
            "split": c.split,
            "revision": c.revision,
            "text_field": c.text_field,
        }


def file_sha256(path: str, known: dict[str, list[Any]] | None = None) -> str:
    """SHA-256 of a file, reused from `known` when its size and mtime are unchanged."""
    st = os.stat(path)
    hit = (known or {}).get(path)
    if hit is not None and hit[:2] == [st.st_size, st.st_mtime_ns]:
        return str(hit[2])
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if known is not None:
        known[path] = [st.st_size, st.st_mtime_ns, digest]
    return digest


def resolve_source(source: SourceConfig, key: str) -> ResolvedSource:
    """Expand globs and pick the format; a pattern that matches no file is an error naming `key`."""
    if source.dataset is not None:
        return ResolvedSource(key, source, (), source.dataset)
    files: list[str] = []
    names: list[str] = []
    for pattern in source.files or []:
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{key}.files: no file matches {pattern!r}")
        base = _fixed_directory(pattern)
        files.extend(matches)
        names.extend(os.path.relpath(p, base) for p in matches)
    builder = source.format or _format_of(files, key)
    return ResolvedSource(key, source, tuple(files), builder, tuple(names))


def _fixed_directory(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: `/data/c/**/*.jsonl` -> `/data/c`."""
    parts = pattern.split(os.sep)
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
    return os.sep.join(parts[:fixed]) or os.sep


def _format_of(files: list[str], key: str) -> str:
    formats = set()
    for name in files:
        fmt = next((f for suffix, f in _FORMAT_BY_SUFFIX.items() if name.endswith(suffix)), None)
        if fmt is None:
            raise DataError(f"{key}: cannot tell the format of {name}; set `format: json|parquet|text`")
        formats.add(fmt)
    if len(formats) > 1:
        raise DataError(
            f"{key}: files of several formats {sorted(formats)}; split them into one source per format"
        )
    return formats.pop()


def open_documents(source: ResolvedSource, policy: RecordPolicy, state: dict | None = None) -> Any:
    """A reader of the source's documents (iterate it; `.state()` resumes it), positioned at `state`."""
    if not source.files:
        return DatasetDocuments(source, policy, state)
    if source.builder == "parquet":
        return ParquetDocuments(source, policy, state)
    return FileDocuments(source, policy, state)


def iter_documents(source: ResolvedSource, policy: RecordPolicy | None = None) -> Iterator[str]:
    """All documents of a source, from the start (tokenizer training, benchmarks)."""
    yield from open_documents(source, policy or RecordPolicy())
