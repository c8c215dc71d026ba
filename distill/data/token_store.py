"""The packed token store: fixed-length sequences in a flat binary file, read through a memory map.

Layout of one store (e.g. `code/train`):
- `train.bin`: the sequences back to back, each `seq_tokens = seq_len + 1` little-endian token ids
  of `dtype` (uint16 when the vocabulary fits, else uint32). Sequence `i` starts at byte
  `i * seq_tokens * itemsize`, so reading it is one O(1) slice of the memory map.
- `train.idx`: a 64-byte header: magic `DSTLIDX1`, dtype code, seq_tokens, number of sequences.
  The reader checks the `.bin` size against it, so a truncated store is an error, never short data.

The writer appends whole sequences only and can truncate back to a committed sequence count, which
is how an interrupted `prepare` resumes to byte-identical output.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from distill.atomic import atomic_write_bytes
from distill.errors import DataError

MAGIC = b"DSTLIDX1"
_HEADER = struct.Struct("<8sBxxxxxxxQQ")  # magic, dtype code, pad, seq_tokens, num_sequences
_HEADER_SIZE = 64
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_CODES = {v: k for k, v in _DTYPES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every token id of a vocabulary."""
    return _DTYPES[1] if vocab_size <= 1 << 16 else _DTYPES[2]


class TokenStoreWriter:
    """Appends `[n, seq_tokens]` blocks to `<prefix>.bin`; `close()` writes `<prefix>.idx`."""

    def __init__(self, prefix: Path, seq_tokens: int, dtype: np.dtype, *, resume_sequences: int = 0) -> None:
        self.prefix = Path(prefix)
        self.seq_tokens = seq_tokens
        self.dtype = np.dtype(dtype)
        self.bin_path = self.prefix.with_suffix(".bin")
        self._seq_bytes = seq_tokens * self.dtype.itemsize
        mode = "r+b" if resume_sequences and self.bin_path.exists() else "wb"
        self._file = open(self.bin_path, mode)
        committed = resume_sequences * self._seq_bytes
        if os.fstat(self._file.fileno()).st_size < committed:
            raise DataError(
                f"{self.bin_path} holds fewer than the {resume_sequences} sequences its progress records"
            )
        self._file.truncate(committed)  # drop anything written after the last committed state
        self._file.seek(committed)
        self.num_sequences = resume_sequences

    def append(self, sequences: np.ndarray) -> None:
        """Append sequences `[n, seq_tokens]`."""
        assert sequences.ndim == 2 and sequences.shape[1] == self.seq_tokens, sequences.shape
        self._file.write(np.ascontiguousarray(sequences, dtype=self.dtype).tobytes())
        self.num_sequences += sequences.shape[0]

    def flush(self) -> None:
        """Make everything appended so far durable (called before progress is committed)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.flush()
        self._file.close()
        header = _HEADER.pack(MAGIC, _CODES[self.dtype], self.seq_tokens, self.num_sequences)
        atomic_write_bytes(self.prefix.with_suffix(".idx"), header.ljust(_HEADER_SIZE, b"\0"))


class TokenStore:
    """Read-only view of one store: `len(store)`, `store[i] -> [seq_tokens]`, never loaded whole."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = Path(prefix)
        idx, bin_path = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        try:
            raw = idx.read_bytes()
        except FileNotFoundError:
            raise DataError(f"token store index {idx} is missing") from None
        if len(raw) != _HEADER_SIZE or not raw.startswith(MAGIC):
            raise DataError(f"{idx} is not a distillery token store index")
        _, code, self.seq_tokens, self.num_sequences = _HEADER.unpack(raw[: _HEADER.size])
        if code not in _DTYPES:
            raise DataError(f"{idx}: unknown dtype code {code}")
        self.dtype = _DTYPES[code]
        expected = self.num_sequences * self.seq_tokens * self.dtype.itemsize
        actual = bin_path.stat().st_size if bin_path.exists() else -1
        if actual != expected:
            raise DataError(
                f"{bin_path} has {actual} bytes, its index promises {expected}: the store is incomplete"
            )
        self.bin_path = bin_path
        self._tokens: np.ndarray | None = None

    def _map(self) -> np.ndarray:
        if self._tokens is None:
            if self.num_sequences == 0:
                self._tokens = np.empty((0, self.seq_tokens), dtype=self.dtype)
            else:
                shape = (self.num_sequences, self.seq_tokens)
                self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=shape)
        return self._tokens

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> np.ndarray:
        """Sequence `index` as a fresh int64 array `[seq_tokens]` (one slice of the memory map)."""
        if not -self.num_sequences <= index < self.num_sequences:
            raise IndexError(
                f"sequence {index} out of range for {self.prefix} ({self.num_sequences} sequences)"
            )
        return self._map()[index].astype(np.int64)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """Sequences `indices` as `[len(indices), seq_tokens]` int64."""
        return self._map()[np.asarray(indices)].astype(np.int64)

    def sha256(self) -> str:
        """Content hash of the token bytes, streamed in 8 MiB chunks."""
        digest = hashlib.sha256()
        with open(self.bin_path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        return digest.hexdigest()
