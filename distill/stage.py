"""One contract for every stage's output directory: complete (skip), partial (resume), or not ours (refuse).

A stage describes its output by a *spec*: everything that determines the bytes it writes (the config
fields it reads, input hashes). `StageOutput.check` compares the directory with that spec:

- **complete**: the stage's record (e.g. `manifest.json`) holds this spec -> skip the stage;
- **partial**: a run of this spec was interrupted (its progress record, `.distillery-progress.json`,
  holds this spec and the same resume facts, e.g. the input files' sizes) -> resume it;
- **fresh**: nothing there yet -> start (`begin` writes the progress record first);
- **replace**: the directory holds another config's output, or files no distillery stage wrote, and
  the user passed `--overwrite` -> the stage starts over (`clear`, or an atomic directory replace);
  a stage whose output is derived from an earlier one (export of the latest checkpoint) replaces an
  outdated output of its own without `--overwrite` (`replace_stale`);
- otherwise refuse with `OutputExistsError`, naming every differing field (`seq_len: 64 on disk, 32 in
  the config`) or the foreign files, and how to proceed.

Stages that write their whole directory atomically (corpus, tokenizer, export) are never partial.
Corpus, tokenizer, prepare, cache and export use this; later stages (eval, report, ULD pairing) will.
"""

from __future__ import annotations

import enum
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.atomic import atomic_write_json, read_json, remove_temporaries
from distill.errors import OutputExistsError

PROGRESS = ".distillery-progress.json"


class Status(enum.Enum):
    COMPLETE = "complete"
    PARTIAL = "partial"
    FRESH = "fresh"
    REPLACE = "replace"


def differences(old: Any, new: Any, key: str = "") -> list[str]:
    """Every leaf field that differs between two specs, as `key: old on disk, new in the config`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
        return out
    return [] if old == new else [f"{key or 'spec'}: {_brief(old)} on disk, {_brief(new)} in the config"]


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 100 else text[:97] + "..."


@dataclass(frozen=True)
class StageOutput:
    stage: str  # "prepare", "cache", ...: named in messages
    directory: Path
    key: str  # the config key that names the directory ("data.dir"), for messages
    spec: dict[str, Any]
    record: str = "manifest.json"  # written last: its presence (with this spec) means complete
    spec_field: str | None = "spec"  # where the record keeps the spec (None: the record is the spec)
    foreign_hint: str | None = None  # what to do about a directory no distillery stage wrote
    replace_stale: bool = False  # another spec's output is derived data, replaced without --overwrite
    working_files: tuple[str, ...] = ()  # names the stage may write before its progress record (not foreign)

    def check(
        self, *, overwrite: bool, resume_facts: dict[str, Any] | None = None, shared: bool = False
    ) -> Status:
        """What to do with the output directory (see the module docstring); raises on a conflict.
        `shared`: other jobs (array tasks) may be writing into it now, so an interrupted run's
        temporaries are left alone (each writer replaces its own)."""
        out = Path(self.directory)
        if out.exists() and not out.is_dir():
            raise OutputExistsError(
                f"{self.key} {out} exists and is not a directory; choose another {self.key}"
            )
        if (out / self.record).is_file() and (found := self.recorded_spec()) is not None:
            if found == self.spec:
                return Status.COMPLETE
            if self.replace_stale:
                return Status.REPLACE
            return self._conflict(
                f"{out} holds a {self.stage} of a different config ({'; '.join(differences(found, self.spec))})",
                "pass --overwrite to replace it",
                overwrite,
            )
        found = self._progress()
        if found is not None:
            diff = differences(found.get("spec"), self.spec) + [
                f"{f}: changed since the interrupted {self.stage}"
                for f in sorted(set(found.get("facts") or {}) | set(resume_facts or {}))
                if (found.get("facts") or {}).get(f) != (resume_facts or {}).get(f)
            ]
            if not diff:
                if not shared:
                    remove_temporaries(out)  # half-written files of the killed run; what they held is redone
                return Status.PARTIAL
            return self._conflict(
                f"{out} holds an interrupted {self.stage} of a different config or input ({'; '.join(diff[:8])})",
                "pass --overwrite to start over",
                overwrite,
            )
        # a write killed before anything else was recorded leaves only temporaries: not foreign
        foreign = (
            sorted(
                p.name
                for p in out.iterdir()
                if not p.name.endswith(".tmp") and p.name not in self.working_files
            )
            if out.is_dir()
            else []
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            return self._conflict(
                f"{self.key} {out} holds files that are not a distillery {self.stage} (no {self.record}; {shown})",
                self.foreign_hint or f"choose another {self.key} or pass --overwrite to replace it",
                overwrite,
            )
        return Status.FRESH

    def _progress(self) -> dict[str, Any] | None:
        """The progress record ({spec, facts}) of an interrupted run, if there is one."""
        out = Path(self.directory)
        try:
            if (out / PROGRESS).is_file():
                return read_json(out / PROGRESS)
        except (OSError, ValueError) as exc:
            raise OutputExistsError(
                f"{out} holds an unreadable progress record ({exc}); pass --overwrite to start over"
            ) from exc
        return None

    def _conflict(self, problem: str, remedy: str, overwrite: bool) -> Status:
        if not overwrite:
            raise OutputExistsError(f"{problem}; {remedy}")
        return Status.REPLACE

    def recorded_spec(self) -> Any:
        """The spec in the completion record; None if it is missing or unreadable (then not ours)."""
        try:
            found = read_json(Path(self.directory) / self.record)
        except (OSError, ValueError):
            return None
        if self.spec_field is None:
            return found
        return found.get(self.spec_field) if isinstance(found, dict) else None

    def clear(self) -> None:
        """Remove the directory (after `check` returned REPLACE, for stages that write in place)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def begin(self, resume_facts: dict[str, Any] | None = None) -> None:
        """Create the directory and record that a run of this spec is in progress (resumable)."""
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(self.directory) / PROGRESS, {"spec": self.spec, "facts": resume_facts or {}})

    def finish(self, record: dict[str, Any]) -> None:
        """Write the completion record (atomically, last) and drop the progress record."""
        atomic_write_json(Path(self.directory) / self.record, record)
        (Path(self.directory) / PROGRESS).unlink(missing_ok=True)
