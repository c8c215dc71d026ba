"""The UTF-8 bytes each token id stands for: what makes two tokenizations of one text comparable.

Bits per byte (eval) needs each token's byte length; cross-tokenizer pairing (`pairing/pairs.py`) needs the
bytes themselves, to give back the exact text of a packed sequence and each token's byte span in it.
The rules, by the tokenizer's decoder:

- **byte-level BPE** (GPT-2, Llama 3, Qwen2, ours): each character of a piece is one byte through
  GPT-2's byte-to-character table, so the bytes are exact, even for a token holding part of a
  multi-byte character.
- **SentencePiece style** (`Metaspace`, `ByteFallback`, `Replace` decoders): `▁` is a space, `<0xNN>`
  is the byte NN, anything else its UTF-8.
- **anything else**: the token decoded alone (exact for most word-piece and character tokenizers).

Special tokens (EOS, padding) stand for no text: 0 bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from distill.data.tokenizer import TokenizerInfo

BYTE_FALLBACK_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE uses for each byte value (GPT-2's table), inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shift)] = byte
            shift += 1
    return chars


def _decoder_types(decoder: dict[str, Any] | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return {t for d in decoder.get("decoders", []) for t in _decoder_types(d)}
    return {decoder.get("type", "")}


@dataclass(frozen=True)
class TokenText:
    """`pieces[id]`: the bytes of token `id` (b"" for special tokens); `method` says how they were found."""

    pieces: list[bytes]
    method: str  # byte-level | sentencepiece | decode
    special: frozenset[int]

    @property
    def lengths(self) -> np.ndarray:
        """`[V]` int64 byte length of each id."""
        return np.fromiter((len(p) for p in self.pieces), dtype=np.int64, count=len(self.pieces))

    def join(self, ids: np.ndarray) -> bytes:
        return b"".join([self.pieces[i] for i in np.asarray(ids, dtype=np.int64).tolist()])


def token_text(info: TokenizerInfo) -> TokenText:
    """The bytes of every token id of a tokenizer (see the module docstring for the rules)."""
    from tokenizers import Tokenizer

    spec = json.loads(info.backend_json)
    tokenizer = Tokenizer.from_str(info.backend_json)
    special = frozenset(t["id"] for t in spec.get("added_tokens", []) if t.get("special"))
    kinds = _decoder_types(spec.get("decoder"))
    if "ByteLevel" in kinds:
        method = "byte-level"
    elif kinds & {"Metaspace", "ByteFallback", "Replace"}:
        method = "sentencepiece"
    else:
        method = "decode"
    alphabet = byte_level_alphabet()
    pieces: list[bytes] = []
    for token_id in range(info.vocab_size):
        piece = tokenizer.id_to_token(token_id)
        if token_id in special or piece is None:
            pieces.append(b"")
        elif method == "byte-level":
            pieces.append(b"".join(bytes([alphabet[ch]]) if ch in alphabet else ch.encode() for ch in piece))
        elif method == "sentencepiece":
            fallback = BYTE_FALLBACK_PIECE.match(piece)
            pieces.append(
                bytes([int(fallback.group(1), 16)]) if fallback else piece.replace("▁", " ").encode()
            )
        else:
            pieces.append(tokenizer.decode([token_id]).encode())
    return TokenText(pieces, method, special)
