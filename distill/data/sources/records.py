"""Reading a source's documents record by record, with a policy for records that are not documents.

Corpora of thousands of files from many places hold lines that are not UTF-8, not JSON, lack the text
field, carry binary data, or run for gigabytes without a newline. Each such *bad record* is named by
file and line (or record number) and either stops the stage (`data.on_bad_record: error`, the default)
or is skipped and counted per source and reason (`skip`), up to a cap (`data.max_bad_records`,
`data.max_bad_fraction` of the records read from one source, checked when the source ends).
Invalid UTF-8 in a text or JSON line is a bad record, or with `data.invalid_utf8: replace` is decoded
with U+FFFD in place of the bad bytes and counted as replaced.

Local files are read here rather than through `datasets` so that a bad line can be named and skipped,
and so that the read position is a byte offset: resuming seeks there instead of re-reading. The record
rules match `datasets`' builders: a JSON Lines record is one object per line (blank lines ignored);
text files are split by `sample_by` into lines, paragraphs (blocks separated by "\\n\\n") or whole
documents, after universal-newline translation; parquet rows are read with pyarrow. `dataset:` sources
still stream through `datasets` (their field errors are named by record number; a failing stream ends
the stage). A reader's `state()` is JSON and resumes to exactly the next record, with its counts.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from typing import IO, Any

from distill.config.schema import DataConfig
from distill.errors import DataError

EXAMPLES = 5  # bad-record locations kept per source for the manifest and the summary


@dataclass(frozen=True)
class RecordPolicy:
    on_bad_record: str = "error"  # error | skip
    invalid_utf8: str = "error"  # error | replace
    max_record_bytes: int = 64 << 20
    max_bad_records: int | None = None
    max_bad_fraction: float | None = 0.01


def policy_of(data: DataConfig) -> RecordPolicy:
    return RecordPolicy(
        on_bad_record=data.on_bad_record,
        invalid_utf8=data.invalid_utf8,
        max_record_bytes=data.max_record_bytes,
        max_bad_records=data.max_bad_records,
        max_bad_fraction=data.max_bad_fraction,
    )


class BadRecord(Exception):
    """One record that is not a document: `reason` says why (raised and caught inside the reader)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Tally:
    """Records read from one source, and the bad and repaired ones by reason (part of a reader's state)."""

    def __init__(self, key: str, policy: RecordPolicy, state: dict[str, Any] | None = None) -> None:
        self.key, self.policy = key, policy
        state = state or {}
        self.records: int = state.get("records", 0)
        self.bad: dict[str, int] = dict(state.get("bad", {}))
        self.replaced_utf8: int = state.get("replaced_utf8", 0)
        self.examples: list[str] = list(state.get("examples", []))

    def state(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "bad": dict(self.bad),
            "replaced_utf8": self.replaced_utf8,
            "examples": list(self.examples),
        }

    def bad_record(self, where: str, reason: str) -> None:
        """Stop (policy error) or count and skip one bad record at `where` (file:line)."""
        if self.policy.on_bad_record == "error":
            raise DataError(
                f"{where}: {reason} ({self.key}); fix it, or set data.on_bad_record: skip to skip and count "
                "such records"
            )
        self.bad[reason] = self.bad.get(reason, 0) + 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(f"{where}: {reason}")
        cap = self.policy.max_bad_records
        if cap is not None and sum(self.bad.values()) > cap:
            raise DataError(
                f"{self.key}: more than data.max_bad_records = {cap} bad records ({self.summary()}); the latest at "
                f"{where}: {reason}"
            )

    def finish(self) -> None:
        """At the source's end: too large a share of bad records is an error."""
        cap, bad = self.policy.max_bad_fraction, sum(self.bad.values())
        if cap is not None and self.records and bad / self.records > cap:
            raise DataError(
                f"{self.key}: {bad} of {self.records} records are bad ({bad / self.records:.2%}), more than "
                f"data.max_bad_fraction = {cap:g}: {self.summary()}"
            )

    def summary(self) -> str:
        parts = [f"{reason} {count}" for reason, count in sorted(self.bad.items())]
        first = f"; first: {self.examples[0]}" if self.examples else ""
        return ", ".join(parts) + first


def decode(raw: bytes, tally: Tally) -> str:
    """UTF-8 text of one record, under the invalid-UTF-8 policy (raises `BadRecord`)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if tally.policy.invalid_utf8 == "replace":
            tally.replaced_utf8 += 1
            return raw.decode("utf-8", errors="replace")
        raise BadRecord(f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def checked_text(value: Any, field: str, fields: Any) -> str:
    """The text field of a record, or `BadRecord` saying what is wrong with it."""
    if value is None and field not in fields:
        raise BadRecord(f"no field {field!r} (fields: {sorted(fields)[:8]}); set text_field")
    if not isinstance(value, str):
        raise BadRecord(f"field {field!r} holds {type(value).__name__}, expected a string")
    if "\x00" in value:
        raise BadRecord("NUL byte in the text (binary data?)")
    return value


def open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


class LineFile:
    """Physical lines of one (possibly gzipped) file with their byte offsets, memory bounded by
    `limit`: a longer line is consumed in pieces and reported as `None` (too long)."""

    def __init__(self, path: str, offset: int, limit: int, key: str) -> None:
        self.path, self.limit, self.key = path, limit, key
        self.file = open_binary(path)
        if offset:
            self.file.seek(offset)  # gzip: decompresses up to there (the only way into a gzip stream)
        self.offset = offset

    def readline(self) -> tuple[bytes | None, int]:
        """(line bytes or None if longer than the limit, its length); (b"", 0) at the end."""
        try:
            line = self.file.readline(self.limit + 1)
            if len(line) <= self.limit or line.endswith(b"\n"):
                self.offset += len(line)
                return line, len(line)
            size = len(line)
            while line and not line.endswith(b"\n"):
                line = self.file.readline(1 << 20)
                size += len(line)
            self.offset += size
            return None, size
        except (OSError, EOFError, zlib.error) as exc:  # a damaged gzip stream
            raise DataError(
                f"{self.path}: cannot be read past byte {self.offset} ({self.key}): {exc}; a damaged file "
                "stops the stage under either data.on_bad_record"
            ) from None

    def close(self) -> None:
        self.file.close()
