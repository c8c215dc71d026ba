"""Document streams: one config `SourceConfig` -> a resumable stream of texts via HF `datasets`.

Every source is opened with `streaming=True`, so a domain never has to fit in memory or on local disk
(hub datasets stream over the network on a cluster). Local globs are expanded and sorted here, so the
document order, and with it every byte of the prepared output, depends only on the files' contents.
The stream's position is `IterableDataset.state_dict()`, which is JSON and resumes exactly.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from distill.config.schema import SourceConfig
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

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this source."""
        if self.files:
            return {"files": list(self.files), "format": self.builder, "text_field": self.config.text_field}
        c = self.config
        return {
            "dataset": c.dataset,
            "name": c.name,
            "split": c.split,
            "revision": c.revision,
            "text_field": c.text_field,
        }


def resolve_source(source: SourceConfig, key: str) -> ResolvedSource:
    """Expand globs and pick the `datasets` builder; missing files are an error naming `key`."""
    if source.dataset is not None:
        return ResolvedSource(key, source, (), source.dataset)
    files: list[str] = []
    for pattern in source.files or []:
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{key}.files: no file matches {pattern!r}")
        files.extend(p for p in matches if os.path.getsize(p) > 0)  # an empty shard holds no document
    if not files:
        raise DataError(f"{key}.files: every matching file is empty ({', '.join(source.files or [])})")
    builder = source.format or _format_of(files, key)
    return ResolvedSource(key, source, tuple(files), builder)


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


def open_stream(source: ResolvedSource, state: dict | None = None) -> Any:
    """The source as a streaming `datasets.IterableDataset`, positioned at `state` if given."""
    from datasets import load_dataset

    c = source.config
    kwargs: dict[str, Any] = {"split": c.split, "streaming": True}
    if source.files:
        kwargs["data_files"] = list(source.files)
        kwargs["split"] = "train"  # local files always form the single split "train"
        if source.builder == "text":
            kwargs["sample_by"] = c.sample_by
    else:
        kwargs.update(
            {k: v for k, v in (("name", c.name), ("data_dir", c.data_dir), ("revision", c.revision)) if v}
        )
    try:
        ds = load_dataset(source.builder, **kwargs)
    except Exception as exc:  # datasets raises many types for a bad spec
        reason = str(exc) or type(exc).__name__
        raise DataError(f"{source.key}: load_dataset({source.builder!r}) failed: {reason}") from None
    if state is not None:
        ds.load_state_dict(state)
    return ds


def iter_documents(source: ResolvedSource, stream: Any) -> Iterator[str]:
    """Texts of `stream`; a missing or non-string text field is an error naming the source."""
    field = source.config.text_field
    for example in stream:
        text = example.get(field)
        if not isinstance(text, str):
            if field not in example:
                raise DataError(
                    f"{source.key}: records have no field {field!r} (fields: {sorted(example)}); set text_field"
                )
            raise DataError(f"{source.key}: field {field!r} holds {type(text).__name__}, expected a string")
        yield text
