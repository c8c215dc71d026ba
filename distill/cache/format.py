"""The teacher logit cache format: compact per-token records, bit-packed ids, companded values.

Every prepared sequence of `seq_len + 1` tokens has `seq_len` predicted positions; the cache stores,
for each, the teacher's signal in one of two modes.

**top-k + tail** (fixed-size records, `topk_record_bytes(k, V)` bytes per position):
    bytes 0-1   float16  lp_max   the largest log-probability (at the cache temperature T)
    bytes 2-3   float16  tail     r = 1 - sum of the k kept probabilities (exact, before quantization)
    bytes 4-5   float16  target   log p(actual next token) at T = 1 (teacher perplexity from the cache)
    then k entries of `entry_bytes` little-endian bytes, sorted by descending probability:
        id (low `id_bits` bits, id_bits = ceil(log2 V)) | value (the remaining high bits, b bits)
    value = round(Q * sqrt(d / R)) with d = lp_max - lp_i >= 0, Q = 2^b - 1, R = 20 nats, clamped to Q.
Entries are 3 bytes when id_bits + 7 <= 24 (V <= 2^17: b >= 7), else 4 bytes. k = 64 at V = 128k is
6 + 64 * 3 = 198 bytes per token. Square-root companding spends the resolution where the probability
mass is: the absolute error of a dequantized probability is at most p_max * 0.43 * sqrt(R) / Q
(0.015 p_max at b = 7, 0.0009 p_max at b = 11), and values below p_max * e^-20 are clamped to it.
The reader rescales the kept probabilities so that kept + tail = 1 exactly, which adds the float16
rounding of the tail (relative 2^-11 of r) as a relative error of at most 2^-11 r / (1 - r) on each kept
probability. With k = V the tail is 0 and the record reproduces the dense distribution within the
value quantization.

**sampled** (RS-KD; variable-size records): N ids drawn with replacement from p at T = 1, kept as the
distinct ids with their counts; the target distribution is count / N (unbiased for p). One sequence of
L positions is one zlib stream (level 6, deterministic) of these columns:
    L bytes        uint8    u_t       number of distinct ids at each position (1 <= u_t <= N <= 255)
    2L bytes       float16  target_t  log p(actual next token) at T = 1
    id_bytes planes of sum(u_t) bytes: the ids, position by position, ascending, delta-coded (the
                   first id of a position as is, then the gap to the previous one), split into byte
                   planes (low byte of every delta, then the next byte, ...; id_bytes = ceil(id_bits / 8))
    sum(u_t) bytes uint8    count     draws of each id
Sorted ids have small gaps and most counts are 1, so the planes compress well: 79 bytes/token of
fixed 3-byte entries became 40 on the demo corpus (about 25 distinct ids per position; 1.5 bytes per
kept entry). Decoding is one `zlib.decompress` and a handful of vectorised numpy operations.
A shard's `.idx` holds the byte offset of every sequence (uint64, n + 1 values), so a reader reaches
any sequence in O(1).

All multi-byte values are little-endian. Shards are `<domain>/<split>/shard_NNNNN.bin` with a `.idx`
of sequence byte offsets (both modes; top-k offsets are also `i * seq_len * record_bytes`) and a
sha256 of both in the manifest.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

FORMAT = "distillery.cache"
VERSION = 2  # 2: sampled records delta-coded and zlib-compressed
MANIFEST = "manifest.json"
VALUE_RANGE_NATS = 20.0
TOPK_HEADER_BYTES = 6


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(vocab_size)))


@dataclass(frozen=True)
class TopKLayout:
    vocab_size: int
    k: int

    @property
    def id_bits(self) -> int:
        return id_bits(self.vocab_size)

    @property
    def entry_bytes(self) -> int:
        return 3 if self.id_bits + 7 <= 24 else 4

    @property
    def value_bits(self) -> int:
        return self.entry_bytes * 8 - self.id_bits

    @property
    def record_bytes(self) -> int:
        return TOPK_HEADER_BYTES + self.k * self.entry_bytes

    @property
    def max_value(self) -> int:
        return (1 << self.value_bits) - 1

    def max_abs_prob_error(self) -> float:
        """Upper bound of |p_i - p_hat_i| / p_max from the value quantization (documented above)."""
        return 0.43 * math.sqrt(VALUE_RANGE_NATS) / self.max_value


@dataclass(frozen=True)
class SampledLayout:
    vocab_size: int
    samples: int

    @property
    def id_bits(self) -> int:
        return id_bits(self.vocab_size)

    @property
    def id_bytes(self) -> int:
        """Byte planes of the delta-coded ids."""
        return math.ceil(self.id_bits / 8)


def pack_entries(low: np.ndarray, high: np.ndarray, low_bits: int, entry_bytes: int) -> np.ndarray:
    """`low | high << low_bits` as `entry_bytes` little-endian bytes each: `[..., n] -> [..., n * entry_bytes]`."""
    word = low.astype(np.uint64) | (high.astype(np.uint64) << np.uint64(low_bits))
    as_bytes = word.astype("<u8").view(np.uint8).reshape(*word.shape, 8)[..., :entry_bytes]
    return as_bytes.reshape(*word.shape[:-1], word.shape[-1] * entry_bytes)


def unpack_entries(raw: np.ndarray, low_bits: int, entry_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack_entries`: `[..., n * entry_bytes] uint8 -> (low, high)` as int64 `[..., n]`."""
    n = raw.shape[-1] // entry_bytes
    padded = np.zeros((*raw.shape[:-1], n, 8), dtype=np.uint8)
    padded[..., :entry_bytes] = raw.reshape(*raw.shape[:-1], n, entry_bytes)
    word = padded.view("<u8")[..., 0]
    low = (word & np.uint64((1 << low_bits) - 1)).astype(np.int64)
    high = (word >> np.uint64(low_bits)).astype(np.int64)
    return low, high


def quantize_logprobs(logprobs: np.ndarray, layout: TopKLayout) -> tuple[np.ndarray, np.ndarray]:
    """Sorted log-probs `[..., k]` -> (lp_max `[...]`, companded values `[..., k]`)."""
    lp_max = logprobs[..., 0]
    gap = np.clip(lp_max[..., None] - logprobs, 0.0, VALUE_RANGE_NATS)
    values = np.rint(layout.max_value * np.sqrt(gap / VALUE_RANGE_NATS)).astype(np.int64)
    return lp_max, values


def dequantize_logprobs(lp_max: np.ndarray, values: np.ndarray, layout: TopKLayout) -> np.ndarray:
    gap = VALUE_RANGE_NATS * (values.astype(np.float64) / layout.max_value) ** 2
    return lp_max[..., None].astype(np.float64) - gap


def encode_topk(
    ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, target: np.ndarray, layout: TopKLayout
) -> bytes:
    """Positions `[n]` with `ids/logprobs [n, k]` (descending) -> `n * record_bytes` bytes."""
    lp_max, values = quantize_logprobs(logprobs, layout)
    header = np.stack([lp_max, np.clip(tail, 0.0, 1.0), target], axis=-1).astype("<f2").view(np.uint8)
    entries = pack_entries(ids, values, layout.id_bits, layout.entry_bytes)
    return np.concatenate([header.reshape(len(ids), TOPK_HEADER_BYTES), entries], axis=-1).tobytes()


def decode_topk(raw: np.ndarray, layout: TopKLayout) -> dict[str, np.ndarray]:
    """`[..., record_bytes] uint8` -> ids `[..., k]`, logprobs `[..., k]` (kept + tail = 1), tail, target."""
    header = np.ascontiguousarray(raw[..., :TOPK_HEADER_BYTES]).view("<f2").astype(np.float64)
    lp_max, tail, target = header[..., 0], header[..., 1], header[..., 2]
    ids, values = unpack_entries(
        np.ascontiguousarray(raw[..., TOPK_HEADER_BYTES:]), layout.id_bits, layout.entry_bytes
    )
    logprobs = dequantize_logprobs(lp_max, values, layout)
    kept = np.exp(logprobs).sum(axis=-1)
    logprobs += (np.log(np.clip(1.0 - tail, 1e-30, None)) - np.log(kept))[..., None]
    return {"ids": ids, "logprobs": logprobs, "tail": tail, "target_logprob": target}


def encode_sampled(
    unique: np.ndarray, counts: np.ndarray, distinct: np.ndarray, target: np.ndarray, layout: SampledLayout
) -> bytes:
    """One sequence: `distinct [L]` ids per position, their `unique` ids (ascending within a position)
    and `counts` concatenated (`[sum(distinct)]`, position by position), `target [L]` -> its bytes."""
    unique = unique.astype(np.int64)
    starts = np.cumsum(distinct) - distinct
    deltas = np.diff(unique, prepend=0)
    deltas[starts] = unique[starts]
    planes = [((deltas >> (8 * j)) & 0xFF).astype(np.uint8).tobytes() for j in range(layout.id_bytes)]
    payload = b"".join(
        [
            distinct.astype(np.uint8).tobytes(),
            target.astype("<f2").tobytes(),
            *planes,
            counts.astype(np.uint8).tobytes(),
        ]
    )
    return zlib.compress(payload, 6)


def decode_sampled(raw: np.ndarray, positions: int, layout: SampledLayout) -> dict[str, np.ndarray]:
    """One sequence's bytes -> `distinct [L]`, `ids`/`counts [sum(distinct)]`, `target_logprob [L]`."""
    payload = np.frombuffer(zlib.decompress(raw.tobytes()), dtype=np.uint8)
    distinct = payload[:positions].astype(np.int64)
    target = payload[positions : 3 * positions].view("<f2").astype(np.float64)
    n = int(distinct.sum())
    body = payload[3 * positions :]
    deltas = np.zeros(n, dtype=np.int64)
    for j in range(layout.id_bytes):
        deltas |= body[j * n : (j + 1) * n].astype(np.int64) << (8 * j)
    counts = body[layout.id_bytes * n : (layout.id_bytes + 1) * n].astype(np.int64)
    running = np.cumsum(deltas)
    starts = np.cumsum(distinct) - distinct
    ids = running - np.repeat(running[starts] - deltas[starts], distinct)  # cumsum restarted per position
    return {"distinct": distinct, "ids": ids, "counts": counts, "target_logprob": target}
