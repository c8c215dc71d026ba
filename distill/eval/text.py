"""The held-out text a model is judged on, and how many UTF-8 bytes each token stands for.

Bits per byte is the tokenizer-independent measure: the same text costs a model `sum(NLL) / ln 2`
bits whichever way it is cut into tokens, and dividing by the text's UTF-8 bytes makes a student with
another tokenizer (ULD) comparable with its teacher. Two things are needed for that:

- **Documents.** Prepare routes whole documents to the held-out stream (each followed by EOS) and cuts
  the stream into disjoint sequences; concatenating the first N sequences and splitting at EOS gives
  back the documents. Their text is `decode(ids)`, and re-encoding it gives the same ids, so
  lm-evaluation-harness, given that text, scores exactly these tokens. The piece after the last EOS is
  the start of a document cut where the N sequences end; it is kept (long documents would otherwise
  leave little text), its text up to the last whole character, re-encoded.
- **Bytes per token**, for the packed held-out sequences evaluated during training: byte-level BPE
  tokens (GPT-2, Llama 3, Qwen2, ours) map back to their bytes through the byte-to-character table;
  SentencePiece-style tokens (`▁` for a space, `<0x0A>` byte fallback) likewise; any other tokenizer
  falls back to the length of each token decoded alone. Special tokens (EOS, padding) are 0 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.data.prepared import PreparedData
from distill.data.token_text import token_text
from distill.data.tokenizer import TokenizerInfo


@dataclass(frozen=True)
class TokenBytes:
    """`lengths[id]`: UTF-8 bytes of token `id` (0 for special tokens); `method` says how it was found."""

    lengths: np.ndarray  # [V] int64
    method: str

    def count(self, ids: np.ndarray) -> int:
        return int(self.lengths[np.asarray(ids, dtype=np.int64)].sum())


def token_bytes(info: TokenizerInfo) -> TokenBytes:
    """Bytes per token id of a tokenizer (the rules of `distill/data/token_text.py`)."""
    text = token_text(info)
    return TokenBytes(text.lengths, text.method)


@dataclass(frozen=True)
class Document:
    """One complete held-out document: its token ids (without the EOS after it) and its text."""

    ids: np.ndarray  # [n] int64
    text: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def heldout_documents(data: PreparedData, domain: str, sequences: int, info: TokenizerInfo) -> list[Document]:
    """The complete documents in the first `sequences` held-out sequences of `domain` (in order)."""
    from tokenizers import Tokenizer

    count = min(sequences, data.num_sequences(domain, "heldout"))
    if count == 0:
        return []
    stream = data.store(domain, "heldout").batch(np.arange(count)).reshape(-1).astype(np.int64)
    ends = np.flatnonzero(stream == info.eos_id)
    tokenizer = Tokenizer.from_str(info.backend_json)
    documents, start = [], 0
    for end in ends:
        ids = stream[start:end]
        start = end + 1
        if len(ids):
            documents.append(Document(ids, tokenizer.decode(ids.tolist(), skip_special_tokens=False)))
    tail = tokenizer.decode(stream[start:].tolist(), skip_special_tokens=False).rstrip("\ufffd")
    if tail:  # a cut document: its bytes may end inside a character
        ids = np.asarray(tokenizer.encode(tail, add_special_tokens=False).ids, dtype=np.int64)
        documents.append(Document(ids, tail))
    return documents


def packed_label_bytes(data: PreparedData, domain: str, sequences: int, table: TokenBytes) -> int:
    """UTF-8 bytes of the predicted tokens (labels `[1:]`) of the first `sequences` held-out sequences:
    the denominator of the packed held-out bits per byte reported during training."""
    count = min(sequences, data.num_sequences(domain, "heldout"))
    if count == 0:
        return 0
    return table.count(data.store(domain, "heldout").batch(np.arange(count))[:, 1:])
