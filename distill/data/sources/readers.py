"""Document readers, one per kind of source: JSON Lines and text files, parquet files, `datasets` streams.

Each reader yields a source's documents in a fixed order and has a `state()` (JSON) that resumes it to
exactly the next document, bad-record counts included. See `records.py` for the record rules and the
bad-record policy they all apply.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

from distill.data.sources.records import BadRecord, LineFile, RecordPolicy, Tally, checked_text, decode
from distill.errors import DataError


class FileDocuments:
    """Documents of local JSON Lines or text files (optionally gzipped), read by physical line."""

    def __init__(self, source: Any, policy: RecordPolicy, state: dict[str, Any] | None = None) -> None:
        st = state or {}
        self.files: tuple[str, ...] = source.files
        self.format: str = source.builder  # json | text
        self.field: str = source.config.text_field
        self.sample_by: str = source.config.sample_by
        self.limit = policy.max_record_bytes
        self.file_index: int = st.get("file", 0)
        self.offset: int = st.get("offset", 0)  # bytes of the current file consumed (uncompressed)
        self.line: int = st.get("line", 0)  # physical lines of the current file consumed
        self.pending: list[list[Any]] = st.get("pending", [])  # [text, line] read, not yet yielded
        self.paragraph: list[Any] = st.get("paragraph", ["", 0, False])  # text, first line, skipping
        self.tally = Tally(source.key, policy, st.get("tally"))

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "file": self.file_index,
                "offset": self.offset,
                "line": self.line,
                "pending": self.pending,
                "paragraph": self.paragraph,
                "tally": self.tally.state(),
            }
        )

    def __iter__(self) -> Iterator[str]:
        while self.file_index < len(self.files):
            yield from self._drain()
            yield from self._read_file(self.files[self.file_index])
            yield from self._drain()
            self.file_index, self.offset, self.line = self.file_index + 1, 0, 0
        self.tally.finish()

    def _drain(self) -> Iterator[str]:
        while self.pending:
            text, _ = self.pending.pop(0)
            yield text

    def _read_file(self, path: str) -> Iterator[str]:
        if self.format == "text" and self.sample_by == "document":
            yield from self._document(path)
            return
        lines = LineFile(path, self.offset, self.limit, self.tally.key)
        try:
            while True:
                raw, size = lines.readline()
                if size == 0:
                    break
                self.line += 1
                self.offset = lines.offset
                self._take(raw, f"{path}:{self.line}")
                yield from self._drain()
            if self.offset == 0:
                self.tally.records += 1
                self.tally.bad_record(path, "empty file")
            self._end_paragraph(path)
            yield from self._drain()
        finally:
            lines.close()

    def _take(self, raw: bytes | None, where: str) -> None:
        """Turn one physical line into pending records (or count it bad)."""
        if self.format == "json":
            if raw is not None and not raw.strip():
                return  # a blank line is not a record
            self.tally.records += 1
            try:
                if raw is None:
                    raise BadRecord(f"line longer than data.max_record_bytes ({self.limit} bytes)")
                try:
                    record = json.loads(decode(raw, self.tally))
                except json.JSONDecodeError as exc:
                    raise BadRecord(f"not JSON: {exc.msg} (column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise BadRecord(f"a JSON {type(record).__name__}, expected an object (one per line)")
                self.pending.append([checked_text(record.get(self.field), self.field, record), self.line])
            except BadRecord as bad:
                self.tally.bad_record(where, bad.reason)
            return
        if self.sample_by == "line":
            self._text_lines(raw, where)
        else:
            self._paragraph_line(raw, where)

    def _decoded(self, raw: bytes | None, where: str) -> str | None:
        """A text line after universal-newline translation, or None for a bad one (counted)."""
        try:
            if raw is None:
                raise BadRecord(f"line longer than data.max_record_bytes ({self.limit} bytes)")
            return _universal_newlines(decode(raw, self.tally))
        except BadRecord as bad:
            self.tally.records += 1
            self.tally.bad_record(where, bad.reason)
            return None

    def _text_lines(self, raw: bytes | None, where: str) -> None:
        text = self._decoded(raw, where)
        if text is None:
            return
        pieces = text.split("\n")
        for piece in pieces[:-1] if text.endswith("\n") else pieces:
            self.tally.records += 1
            try:
                self.pending.append([checked_text(piece, "text", ("text",)), self.line])
            except BadRecord as bad:
                self.tally.bad_record(where, bad.reason)

    def _paragraph_line(self, raw: bytes | None, where: str) -> None:
        """Paragraphs: text blocks split on "\\n\\n" (as `datasets`' text builder), bounded in size."""
        piece = self._decoded(raw, where)
        if piece is None:
            return
        text, first, skipping = self.paragraph
        if not text and not skipping:
            first = self.line
        text += piece
        while "\n\n" in text:
            head, text = text.split("\n\n", 1)
            if skipping:
                skipping = False
            elif head:
                self._paragraph(head, first)
            first = self.line
        if len(text) > self.limit and not skipping:
            self.tally.records += 1
            self.tally.bad_record(where, f"paragraph longer than data.max_record_bytes ({self.limit} bytes)")
            text, skipping = "", True
        elif skipping:
            text = text[-1:]  # only a pending "\n" matters while skipping
        self.paragraph = [text, first, skipping]

    def _paragraph(self, text: str, line: int) -> None:
        self.tally.records += 1
        try:
            self.pending.append([checked_text(text, "text", ("text",)), line])
        except BadRecord as bad:
            self.tally.bad_record(f"{self.files[self.file_index]}:{line}", bad.reason)

    def _end_paragraph(self, path: str) -> None:
        if self.format == "text" and self.sample_by == "paragraph":
            text, first, skipping = self.paragraph
            if text and not skipping:
                self._paragraph(text, first)
            self.paragraph = ["", 0, False]

    def _document(self, path: str) -> Iterator[str]:
        if self.offset:  # this file's document was yielded before the resume
            return
        lines = LineFile(path, 0, self.limit, self.tally.key)
        try:
            raw = lines.file.read(self.limit + 1)
        finally:
            lines.close()
        self.offset = max(1, len(raw))
        self.tally.records += 1
        try:
            if not raw:
                raise BadRecord("empty file")
            if len(raw) > self.limit:
                raise BadRecord(f"document longer than data.max_record_bytes ({self.limit} bytes)")
            text = checked_text(_universal_newlines(decode(raw, self.tally)), "text", ("text",))
        except BadRecord as bad:
            self.tally.bad_record(path, bad.reason)
            return
        yield text


def _universal_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


class ParquetDocuments:
    """Documents of local parquet files: the text column read row group by row group."""

    def __init__(self, source: Any, policy: RecordPolicy, state: dict[str, Any] | None = None) -> None:
        st = state or {}
        self.files: tuple[str, ...] = source.files
        self.field: str = source.config.text_field
        self.limit = policy.max_record_bytes
        self.file_index: int = st.get("file", 0)
        self.row: int = st.get("row", 0)  # rows of the current file consumed
        self.tally = Tally(source.key, policy, st.get("tally"))

    def state(self) -> dict[str, Any]:
        return {"file": self.file_index, "row": self.row, "tally": self.tally.state()}

    def __iter__(self) -> Iterator[str]:
        import pyarrow.parquet as pq

        while self.file_index < len(self.files):
            path = self.files[self.file_index]
            try:
                parquet = pq.ParquetFile(path)
            except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
                raise DataError(f"{path}: not a readable parquet file ({exc})") from None
            yield from self._rows(path, parquet)
            self.file_index, self.row = self.file_index + 1, 0
        self.tally.finish()

    def _rows(self, path: str, parquet: Any) -> Iterator[str]:
        names = parquet.schema_arrow.names
        if self.field not in names:
            rows = parquet.metadata.num_rows - self.row
            self.tally.records += rows
            for _ in range(rows if self.tally.policy.on_bad_record == "skip" else 1):
                self.tally.bad_record(path, f"no field {self.field!r} (fields: {names[:8]}); set text_field")
            self.row += rows
            return
        start = 0
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            if start + size <= self.row:
                start += size
                continue
            values = parquet.read_row_group(group, columns=[self.field]).column(0).to_pylist()
            for value in values[self.row - start :]:
                self.row += 1
                self.tally.records += 1
                try:
                    text = checked_text(value, self.field, names)
                    if len(text) > self.limit:
                        raise BadRecord(f"text longer than data.max_record_bytes ({self.limit})")
                except BadRecord as bad:
                    self.tally.bad_record(f"{path}: row {self.row}", bad.reason)
                    continue
                yield text
            start += size


class DatasetDocuments:
    """Documents of a `datasets.load_dataset` stream (hub or local script); position = its state_dict."""

    def __init__(self, source: Any, policy: RecordPolicy, state: dict[str, Any] | None = None) -> None:
        st = state or {}
        self.key, self.field = source.key, source.config.text_field
        self.stream = open_stream(source, st.get("stream"))
        self.tally = Tally(source.key, policy, st.get("tally"))

    def state(self) -> dict[str, Any]:
        return {"stream": copy.deepcopy(self.stream.state_dict()), "tally": self.tally.state()}

    def __iter__(self) -> Iterator[str]:
        examples = iter(self.stream)
        while True:
            try:
                example = next(examples)
            except StopIteration:
                break
            except Exception as exc:  # the stream itself failed: it cannot be resumed past this point
                raise DataError(
                    f"{self.key}: reading record {self.tally.records + 1} failed: {str(exc) or type(exc).__name__}"
                ) from None
            self.tally.records += 1
            try:
                yield checked_text(example.get(self.field), self.field, example)
            except BadRecord as bad:
                self.tally.bad_record(f"{self.key} record {self.tally.records}", bad.reason)
        self.tally.finish()


def open_stream(source: Any, state: dict | None = None) -> Any:
    """A `dataset:` source as a streaming `datasets.IterableDataset`, positioned at `state` if given."""
    from datasets import load_dataset

    c = source.config
    kwargs: dict[str, Any] = {"split": c.split, "streaming": True}
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
