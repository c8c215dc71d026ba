"""Reading a prepared dataset: the manifest that later stages check, and O(1) access to sequences.

A prepared directory is complete exactly when `manifest.json` exists (it is written last, atomically).
`PreparedData` refuses anything else, so the cache and training stages never read a half-written
prepare. Sequence `i` of domain `d` is a slice of a memory map; nothing is loaded up front, and each
block of a store is checked against its checksum the first time this process reads it (see
`token_store.py`), so a store changed after `prepare` never reaches a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from distill.atomic import read_json
from distill.data.token_store import TokenStore
from distill.errors import DataError

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
FORMAT = "distillery.prepared"
VERSION = 1
Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")


def read_prepared_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete prepare in `directory`, or None if there is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path} is not a {FORMAT} v{VERSION} manifest")
    return manifest


Side = Literal["student", "teacher"]


class PreparedData:
    """A complete prepared dataset: `data.sequence("code", 17)` -> `[seq_len + 1]` int64 token ids.

    A paired prepare (a teacher with another tokenizer, `pairing/pairs.py`) also holds every sequence in the
    teacher's tokens: `PreparedData(dir, side="teacher")` reads those (the teacher's `seq_len` and
    tokenizer), with the same domains, splits and sequence indices, so the cache stage runs on it as on
    any prepared data; `offsets(domain, split, indices)` gives the rows the alignment reads."""

    def __init__(self, directory: Path, side: Side = "student") -> None:
        self.directory = Path(directory)
        manifest = read_prepared_manifest(self.directory)
        if manifest is None:
            raise DataError(
                f"{self.directory} holds no complete prepared data (no {MANIFEST}); run `distillery prepare`"
            )
        self.manifest = manifest
        self.seq_len: int = manifest["seq_len"]
        self.domains: tuple[str, ...] = tuple(manifest["domains"])
        self.fingerprint: str = manifest["fingerprint"]
        self.tokenizer_sha256: str = manifest["tokenizer"]["sha256"]
        self.student_seq_len: int = manifest["seq_len"]
        teacher = manifest.get("teacher_tokenizer")
        self.teacher_tokenizer_sha256: str | None = teacher["sha256"] if teacher else None
        self.side = side
        if side == "teacher":
            if teacher is None:
                raise DataError(
                    f"{self.directory} holds no teacher-side sequences: it was prepared without a teacher of "
                    "another tokenizer (set `teacher` in the config and run `distillery prepare` again)"
                )
            self.seq_len, self.tokenizer_sha256 = manifest["teacher_seq_len"], teacher["sha256"]
        self._stores: dict[tuple[str, str], TokenStore] = {}

    @property
    def paired(self) -> bool:
        return self.teacher_tokenizer_sha256 is not None

    def store(self, domain: str, split: Split = "train") -> TokenStore:
        if domain not in self.manifest["domains"]:
            raise DataError(f"{self.directory}: no domain {domain!r}; it has {list(self.domains)}")
        key = (domain, split)
        if key not in self._stores:
            recorded = self.manifest["domains"][domain]
            if self.side == "teacher":
                sums = recorded["teacher"]["splits"][split]["teacher_sums_sha256"]
                store = TokenStore(self.directory / domain / "teacher" / split, sums_sha256=sums)
            else:
                store = TokenStore(
                    self.directory / domain / split,
                    sums_sha256=recorded.get(f"{split}_sums_sha256"),
                    sha256=recorded.get(f"{split}_sha256"),
                )
            if store.seq_tokens != self.seq_len + 1:
                raise DataError(
                    f"{store.prefix}: sequences of {store.seq_tokens} tokens, manifest says {self.seq_len + 1}"
                )
            self._stores[key] = store
        return self._stores[key]

    def num_sequences(self, domain: str, split: Split = "train") -> int:
        return int(self.manifest["domains"][domain][f"{split}_sequences"])

    def offsets(self, domain: str, indices: np.ndarray, split: Split = "train") -> np.ndarray:
        """Paired data: the byte-offset rows `[n, 1 + S + 1 + T + 1]` of sequences `indices`
        (`alignment.split_offset_row` reads one)."""
        if not self.paired:
            raise DataError(
                f"{self.directory} was prepared without a teacher of another tokenizer: no offsets"
            )
        key = (domain, f"offsets_{split}")
        if key not in self._stores:
            sums = self.manifest["domains"][domain]["teacher"]["splits"][split]["offsets_sums_sha256"]
            self._stores[key] = TokenStore(
                self.directory / domain / "teacher" / f"offsets_{split}", sums_sha256=sums
            )
        return self._stores[key].batch(np.asarray(indices))

    def sequence(self, domain: str, index: int, split: Split = "train") -> np.ndarray:
        """Sequence `index` of `domain`: `[seq_len + 1]` tokens (inputs `[:-1]`, labels `[1:]`)."""
        return self.store(domain, split)[index]

    def tokens(self, keys: list[tuple[str, str, int]]) -> torch.Tensor:
        """The sequences of `keys` ((domain, split, index) each) as one batch `[b, seq_len + 1]` (int64)."""
        import torch  # here: prepare's workers read this module and need no torch

        return torch.from_numpy(
            np.stack([self.sequence(domain, index, split) for domain, split, index in keys])
        )
