"""`CacheReader`: the cached teacher signal of any prepared sequence, read in O(1).

At start it checks the manifest against what the run uses (prepared data fingerprint, tokenizer hash,
vocabulary size) and refuses a mismatch with a message saying what differs. Shards are checksummed
lazily: the first time this process maps a shard, its `.bin` and `.idx` are hashed against the manifest
and a mismatch raises a `DataError` naming the shard before any of its rows are returned. Start-up so
costs O(1) in the cache size (a 40 TB cache is never read whole before step one), and the hashing is
spread over training, mostly in the read-ahead thread. `verify` checks every shard now (`distillery
cache verify`). `batch` returns the tensors the losses need for a list of sequences. Reading ahead of
training is the cached teacher source's job (`distill/teacher/cached.py`).
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.atomic import read_json
from distill.cache.format import (
    FORMAT,
    MANIFEST,
    VERSION,
    SampledLayout,
    TopKLayout,
    decode_sampled,
    decode_topk,
)
from distill.data.prepared import PreparedData
from distill.errors import DataError

SequenceKey = tuple[str, str, int]  # (domain, split, index)


def read_cache_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{directory} holds no complete teacher cache (no {MANIFEST}); run `distillery cache`"
        )
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{directory} is a teacher cache of format v{manifest.get('version')}; this distillery reads "
            f"v{VERSION}: rebuild it (`distillery cache CONFIG --overwrite`)"
        )
    return manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_errors(directory: Path, shard: dict[str, Any]) -> list[str]:
    """What is wrong with one shard's files (missing, or bytes that do not match the manifest)."""
    path = Path(directory) / shard["file"]
    index = path.with_suffix(".idx")
    if not path.is_file():
        return [f"{shard['file']}: missing"]
    errors = []
    if file_sha256(path) != shard["sha256"]:
        errors.append(f"{shard['file']}: checksum mismatch (the file changed or is corrupt)")
    if not index.is_file() or file_sha256(index) != shard["idx_sha256"]:
        errors.append(f"{shard['file'][:-4]}.idx: missing or checksum mismatch")
    return errors


def shard_checksum_errors(directory: Path, shards: list[dict[str, Any]]) -> list[str]:
    """Shards whose files are missing or whose bytes do not match the manifest's sha256."""
    return [error for shard in shards for error in shard_errors(directory, shard)]


class CacheReader:
    def __init__(
        self, directory: Path, *, prepared: PreparedData, tokenizer_sha256: str, vocab_size: int
    ) -> None:
        self.directory = Path(directory)
        self.manifest = read_cache_manifest(self.directory)
        spec = self.manifest["spec"]
        self.mode: str = spec["mode"]
        self.seq_len: int = spec["seq_len"]
        problems = []
        if spec["prepared_fingerprint"] != prepared.fingerprint:
            problems.append(
                f"it was written from prepared data with fingerprint {spec['prepared_fingerprint'][:12]}, but "
                f"{prepared.directory} has {prepared.fingerprint[:12]}"
            )
        if spec["tokenizer_sha256"] != tokenizer_sha256:
            problems.append(
                f"its tokenizer is {spec['tokenizer_sha256'][:12]}, the student's is {tokenizer_sha256[:12]}"
            )
        if spec["teacher_vocab_size"] > vocab_size:
            problems.append(
                f"the teacher's vocabulary ({spec['teacher_vocab_size']}) exceeds the student's ({vocab_size})"
            )
        if problems:
            raise DataError(f"teacher cache {self.directory} does not match this run: " + "; ".join(problems))
        vocab = spec["teacher_vocab_size"]
        self.topk = TopKLayout(vocab, spec["k"]) if self.mode == "topk" else None
        self.sampled = SampledLayout(vocab, spec["samples"]) if self.mode == "sampled" else None
        self._shards: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for shard in self.manifest["shards"]:
            self._shards.setdefault((shard["domain"], shard["split"]), []).append(shard)
        self._starts = {key: [s["start"] for s in shards] for key, shards in self._shards.items()}
        self._maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._map_lock = threading.Lock()  # the read-ahead thread and the main thread both read

    def verify(self, rank: int = 0, world: int = 1) -> list[str]:
        """Checksum the shards `rank, rank + world, ...` now (all of them by default)."""
        return shard_checksum_errors(self.directory, self.manifest["shards"][rank::world])

    def _map(self, shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        with self._map_lock:
            if shard["file"] not in self._maps:
                self._maps[shard["file"]] = self._verified_map(shard)
            return self._maps[shard["file"]]

    def _verified_map(self, shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Map a shard after checking its checksums (once per shard per process)."""
        errors = shard_errors(self.directory, shard)
        if errors:
            raise DataError(
                f"teacher cache {self.directory} is damaged, refusing to use its rows: {'; '.join(errors)}. "
                f"`distillery cache verify {self.directory}` checks every shard; rebuild the cache with "
                "`distillery cache CONFIG --overwrite`"
            )
        path = self.directory / shard["file"]
        data = np.memmap(path, dtype=np.uint8, mode="r") if shard["bytes"] else np.empty(0, np.uint8)
        offsets = np.fromfile(path.with_suffix(".idx"), dtype="<u8")
        return data, offsets

    def _raw(self, key: SequenceKey) -> np.ndarray:
        domain, split, index = key
        shards = self._shards.get((domain, split))
        if not shards:
            raise DataError(f"teacher cache {self.directory} has no {domain}/{split} sequences")
        shard = shards[bisect.bisect_right(self._starts[(domain, split)], index) - 1]
        if not shard["start"] <= index < shard["end"]:
            raise IndexError(f"{domain}/{split} sequence {index} is not in the cache")
        data, offsets = self._map(shard)
        i = index - shard["start"]
        return np.asarray(data[offsets[i] : offsets[i + 1]])

    def sequence(self, key: SequenceKey) -> dict[str, np.ndarray]:
        """The decoded signal of one sequence (see `format.py`)."""
        raw = self._raw(key)
        if self.topk is not None:
            return decode_topk(raw.reshape(self.seq_len, self.topk.record_bytes), self.topk)
        assert self.sampled is not None
        return decode_sampled(raw, self.seq_len, self.sampled)

    def batch(self, keys: list[SequenceKey]) -> dict[str, torch.Tensor]:
        """Tensors for the losses. top-k: ids/logprobs `[b, s, k]`, tail `[b, s]`; sampled: ids/weights
        `[b, s, u_max]` (weights = count / N, padding id -1 with weight 0); both: target_logprob `[b, s]`."""
        decoded = [self.sequence(key) for key in keys]
        out: dict[str, torch.Tensor] = {
            "target_logprob": torch.from_numpy(np.stack([d["target_logprob"] for d in decoded])).float()
        }
        if self.topk is not None:
            out["ids"] = torch.from_numpy(np.stack([d["ids"] for d in decoded]))
            out["logprobs"] = torch.from_numpy(np.stack([d["logprobs"] for d in decoded])).float()
            out["tail"] = torch.from_numpy(np.stack([d["tail"] for d in decoded])).float()
            return out
        assert self.sampled is not None
        u_max = max(int(d["distinct"].max()) for d in decoded)
        ids = np.full((len(keys), self.seq_len, u_max), -1, dtype=np.int64)
        weights = np.zeros((len(keys), self.seq_len, u_max), dtype=np.float32)
        for b, d in enumerate(decoded):
            position = np.repeat(np.arange(self.seq_len), d["distinct"])
            slot = np.arange(len(position)) - np.repeat(
                np.cumsum(d["distinct"]) - d["distinct"], d["distinct"]
            )
            ids[b, position, slot] = d["ids"]
            weights[b, position, slot] = d["counts"] / self.sampled.samples
        out["ids"], out["weights"] = torch.from_numpy(ids), torch.from_numpy(weights)
        return out
