"""The tokenizer worker process of `prepare`: text batch -> token ids with EOS, doc lengths, routing scores.

Kept apart from the rest of `prepare` so that spawning a worker imports only numpy and `tokenizers`. Each worker
runs the Rust tokenizer single-threaded; parallelism comes from the processes, which also keeps the
tokenizer's thread pool from being forked.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

_tokenizer = None
_eos_id = -1


def init_worker(backend_json: str, eos_id: int) -> None:
    global _tokenizer, _eos_id
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _tokenizer = Tokenizer.from_str(backend_json)
    _eos_id = eos_id


def heldout_score(text: str) -> float:
    """A stable pseudo-random number in [0, 1) per document text: held-out routing needs no RNG state."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize documents without special tokens and end each with EOS.

    Returns `tokens [sum(lengths)] uint32`, `lengths [n] int64` (0 for a document with no tokens,
    which is skipped) and `scores [n] float64` from `heldout_score`.
    """
    assert _tokenizer is not None, "init_worker was not called"
    encodings = _tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter(
        (len(e.ids) + 1 if e.ids else 0 for e in encodings), dtype=np.int64, count=len(texts)
    )
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    offset = 0
    for enc, length in zip(encodings, lengths, strict=True):
        if length:
            tokens[offset : offset + length - 1] = enc.ids
            tokens[offset + length - 1] = _eos_id
            offset += length
    scores = np.fromiter((heldout_score(t) for t in texts), dtype=np.float64, count=len(texts))
    return tokens, lengths, scores
