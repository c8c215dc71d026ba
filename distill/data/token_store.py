"""The packed token store: fixed-length sequences in a flat binary file, read through a memory map.

Layout of one store (e.g. `code/train`):
- `train.bin`: the sequences back to back, each `seq_tokens = seq_len + 1` little-endian token ids
  of `dtype` (uint16 when the vocabulary fits, else uint32). Sequence `i` starts at byte
  `i * seq_tokens * itemsize`, so reading it is one O(1) slice of the memory map.
- `train.idx`: a 64-byte header: magic `DSTLIDX1`, dtype code, seq_tokens, number of sequences.
  The reader checks the `.bin` size against it, so a truncated store is an error, never short data.
- `train.sums`: SHA-256 of every block of `block_sequences` sequences (about 8 MiB): a 64-byte header
  (magic `DSTLSUM1`, block_sequences, number of blocks) and 32 bytes per block. A reader given the
  expected checksums verifies each block the first time it reads from it, so a flipped byte stops the
  run before its sequence is used, and no process ever has to hash a terabyte store before step one.

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
SUMS_MAGIC = b"DSTLSUM1"
_SUMS_HEADER = struct.Struct("<8sQQ")  # magic, block_sequences, number of blocks
BLOCK_BYTES = 8 << 20
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

    def close(self) -> dict[str, str]:
        """Write the index and the block checksums; returns the sha256 of the whole `.bin` and of the
        `.sums` file (one read pass over the store), for the manifest."""
        self.flush()
        self._file.close()
        header = _HEADER.pack(MAGIC, _CODES[self.dtype], self.seq_tokens, self.num_sequences)
        atomic_write_bytes(self.prefix.with_suffix(".idx"), header.ljust(_HEADER_SIZE, b"\0"))
        block_sequences = max(1, BLOCK_BYTES // self._seq_bytes)
        whole, blocks = hashlib.sha256(), []
        with open(self.bin_path, "rb") as f:
            while chunk := f.read(block_sequences * self._seq_bytes):
                whole.update(chunk)
                blocks.append(hashlib.sha256(chunk).digest())
        sums = _SUMS_HEADER.pack(SUMS_MAGIC, block_sequences, len(blocks)).ljust(_HEADER_SIZE, b"\0")
        sums += b"".join(blocks)
        atomic_write_bytes(self.prefix.with_suffix(".sums"), sums)
        return {"sha256": whole.hexdigest(), "sums_sha256": hashlib.sha256(sums).hexdigest()}


class TokenStore:
    """Read-only view of one store: `len(store)`, `store[i] -> [seq_tokens]`, never loaded whole.

    With `sums_sha256` (from the prepared manifest) every block is checksummed the first time it is read
    (`DataError` naming the file and sequences on a mismatch); with only `sha256` (stores written before
    block checksums existed) the whole file is one block."""

    def __init__(self, prefix: Path, *, sums_sha256: str | None = None, sha256: str | None = None) -> None:
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
        self._block_sums: list[bytes] | None = None
        self._block_sequences = max(1, self.num_sequences)
        if sums_sha256 is not None:
            self._load_sums(sums_sha256)
        elif sha256 is not None:
            self._block_sums = [bytes.fromhex(sha256)]
        blocks = len(self._block_sums) if self._block_sums is not None else 0
        self._verified = np.zeros(blocks, dtype=bool)

    def _load_sums(self, expected: str) -> None:
        path = self.prefix.with_suffix(".sums")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"token store checksums {path} are missing") from None
        if hashlib.sha256(raw).hexdigest() != expected:
            raise DataError(f"{path} does not match the checksum the manifest records (changed or corrupt)")
        magic, self._block_sequences, count = _SUMS_HEADER.unpack(raw[: _SUMS_HEADER.size])
        if magic != SUMS_MAGIC or len(raw) != _HEADER_SIZE + 32 * count:
            raise DataError(f"{path} is not a distillery token store checksum file")
        self._block_sums = [raw[_HEADER_SIZE + 32 * i : _HEADER_SIZE + 32 * (i + 1)] for i in range(count)]

    def _check(self, indices: np.ndarray) -> None:
        """Verify the blocks holding `indices` that this process has not verified yet."""
        if self._block_sums is None or self._verified.all():  # the common case once warmed up
            return
        blocks = np.unique(np.asarray(indices) % max(1, self.num_sequences) // self._block_sequences)
        for block in blocks[~self._verified[blocks]].tolist():
            first = block * self._block_sequences
            count = min(self._block_sequences, self.num_sequences - first)
            seq_bytes = self.seq_tokens * self.dtype.itemsize
            with open(self.bin_path, "rb") as f:
                f.seek(first * seq_bytes)
                digest = hashlib.sha256(f.read(count * seq_bytes)).digest()
            if digest != self._block_sums[block]:
                raise DataError(
                    f"{self.bin_path}: sequences {first}-{first + count - 1} do not match their checksum (the "
                    "file changed or is corrupt since `prepare`); refusing to train on them. Re-run "
                    "`distillery prepare CONFIG --overwrite`"
                )
            self._verified[block] = True

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
        self._check(np.asarray([index]))
        return self._map()[index].astype(np.int64)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """Sequences `indices` as `[len(indices), seq_tokens]` int64."""
        self._check(np.asarray(indices))
        return self._map()[np.asarray(indices)].astype(np.int64)

    def sha256(self) -> str:
        """Content hash of the token bytes, streamed in 8 MiB chunks."""
        digest = hashlib.sha256()
        with open(self.bin_path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        return digest.hexdigest()
