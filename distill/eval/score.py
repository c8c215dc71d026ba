"""Score one model on the held-out documents of prepared data: cross-entropy, perplexity, bits per byte.

Runs in one process on one device (`cuda` when present) with `transformers`, whatever the model's
origin: an HF directory, or a training checkpoint of any layout (resharded to one process by
`load_as_hf`). Every document is scored with rolling windows (`windows.py`, lm-evaluation-harness's
protocol), so the numbers are those a downstream team gets from lm-eval on the same text.

Per domain: `ce` = summed NLL / predicted tokens (nats), `ppl = exp(ce)`, `bits_per_byte` = summed
NLL / ln 2 / UTF-8 bytes of the documents. `all` pools the domains (tokens and bytes summed).

The documents are always the data's (their text decoded with the tokenizer the data was prepared
with). A model with that tokenizer is scored on the data's ids; a model with another tokenizer (a ULD
teacher) is scored on the same text re-encoded with its own tokenizer, with its own prefix token.
Bits per byte divides by the text's bytes either way, so the numbers compare; `ce`, `ppl` and `tokens`
are per the model's own tokens. A document the model's tokenizer cannot reproduce exactly (one that
normalizes or drops characters) is still scored, and counted in `inexact_documents` (`exact_text`
false): that model was judged on slightly different text.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distill.data.prepared import PreparedData
from distill.data.tokenizer import TokenizerInfo, load_tokenizer
from distill.errors import DataError
from distill.eval.text import Document, heldout_documents
from distill.eval.windows import Window, rolling_windows
from distill.hub import HubModel, ModelLocation
from distill.messages import say
from distill.models.weights import Weights, find_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Tally:
    """Summed NLL (nats) over `tokens` predicted tokens of `documents` documents of `bytes` bytes."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    inexact_documents: int = 0  # re-encoded documents whose tokens do not decode back to their text

    def add(self, other: Tally) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.documents += other.documents
        self.inexact_documents += other.inexact_documents

    def summary(self) -> dict[str, Any]:
        ce = self.nll / self.tokens if self.tokens else float("nan")
        return {
            "ce": ce,
            "ppl": math.exp(ce) if self.tokens else float("nan"),
            "bits_per_byte": self.nll / math.log(2) / self.bytes if self.bytes else float("nan"),
            **asdict(self),
            "exact_text": self.inexact_documents == 0,
        }


def model_weights(path: ModelLocation) -> Weights:
    """The weights at `path` (a directory, checkpoint or hub id), or an error saying what a model path must
    be."""
    if isinstance(path, HubModel):
        return find_weights(path)
    path = Path(path)
    if not path.exists():
        raise DataError(f"model {path} does not exist")
    try:
        return find_weights(path)
    except DataError as exc:
        raise DataError(
            f"{path} is neither a Hugging Face model directory (no config.json) nor a distillery "
            f"checkpoint ({exc})"
        ) from None


def prefix_token(tokenizer_dir: Path, info: TokenizerInfo) -> int:
    """The token the first window starts from: BOS if the tokenizer has one, else EOS (as lm-eval)."""
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True).bos_token_id
    return int(bos) if bos is not None else info.eos_id


def find_data_tokenizer(data: PreparedData, candidates: Iterable[TokenizerInfo] = ()) -> TokenizerInfo:
    """The tokenizer `data` was prepared with, which the held-out text is decoded with whatever model is
    scored: a candidate's (a model's, already loaded) when one is it, else the one at the path the
    prepared manifest records, if that is still the same tokenizer."""
    for info in candidates:
        if info.sha256 == data.tokenizer_sha256:
            return info
    recorded = data.manifest.get("tokenizer", {}).get("path")
    hint = (
        f"the held-out text of {data.directory} is decoded with the tokenizer it was prepared with "
        f"(sha256 {data.tokenizer_sha256[:12]}); evaluate a model with that tokenizer beside the others, "
        "or put that tokenizer back"
    )
    if recorded is None:
        raise DataError(f"{data.directory}: the manifest records no tokenizer path; {hint}")
    try:
        info = load_tokenizer(Path(recorded))
    except DataError as exc:
        raise DataError(f"{exc}; {hint}") from None
    if info.sha256 != data.tokenizer_sha256:
        raise DataError(f"{recorded} is now another tokenizer (sha256 {info.sha256[:12]}); {hint}")
    return info


def tokenizer_record(info: TokenizerInfo, data: PreparedData) -> dict[str, Any]:
    """Which tokenizer a model was scored with, for `eval.json`: the data's (scored on the data's ids)
    or its own (scored on the text re-encoded), so a reader knows whose tokens `ce` and `ppl` count."""
    return {
        "sha256": info.sha256,
        "vocab_size": info.vocab_size,
        "same_as_data": info.sha256 == data.tokenizer_sha256,
    }


def reencode(documents: list[Document], info: TokenizerInfo) -> tuple[list[Document], int]:
    """The documents' text encoded with tokenizer `info` (the text, hence the bytes, unchanged), and how
    many documents do not round-trip (`decode(ids) != text`): those are scored on what the tokenizer
    made of them, which the caller must say."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(info.backend_json)
    encoded, inexact = [], 0
    for document in documents:
        ids = tokenizer.encode(document.text, add_special_tokens=False).ids
        if tokenizer.decode(ids, skip_special_tokens=False) != document.text:
            inexact += 1
        encoded.append(Document(np.asarray(ids, dtype=np.int64), document.text))
    return encoded, inexact


@torch.no_grad()
def score_windows(
    model: torch.nn.Module, windows: list[Window], *, micro_batch: int, device: torch.device
) -> float:
    """Summed NLL (nats) of every window's targets. Windows are right-padded to the longest in a
    micro-batch; causal attention keeps padding out of every scored position."""
    total = 0.0
    for start in range(0, len(windows), micro_batch):
        batch = windows[start : start + micro_batch]
        width = max(len(w.inputs) for w in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)  # [b, n]
        for row, w in enumerate(batch):
            inputs[row, : len(w.inputs)] = torch.tensor(w.inputs)
        logits = model(input_ids=inputs.to(device)).logits  # [b, n, V]
        for row, w in enumerate(batch):
            end = len(w.inputs)
            scored = logits[row, end - w.predicted : end].float().log_softmax(-1)  # [p, V]
            targets = torch.tensor(w.targets, device=scored.device)
            total -= float(scored.gather(1, targets[:, None]).sum())
    return total


def score_documents(
    model: torch.nn.Module,
    documents: Iterable[Document],
    *,
    prefix: int,
    max_len: int,
    micro_batch: int,
    device: torch.device,
) -> Tally:
    tally = Tally()
    windows: list[Window] = []
    for document in documents:
        windows += rolling_windows(document.ids.tolist(), prefix, max_len)
        tally.tokens += len(document.ids)
        tally.bytes += document.num_bytes
        tally.documents += 1
    tally.nll = score_windows(model, windows, micro_batch=micro_batch, device=device)
    return tally


def score_model(
    path: ModelLocation,
    data: PreparedData,
    *,
    sequences: int,
    dtype: str = "float32",
    micro_batch: int = 8,
    progress: bool = True,
    data_tokenizer: TokenizerInfo | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Per-domain and pooled scores of the model at `path` on `data`'s held-out documents.

    `data_tokenizer` is the data's (found from the model or the manifest when not given); `name` is
    what warnings and the progress bar call the model."""
    from distill.engine.megatron.convert import load_as_hf

    name = name or Path(str(path)).name
    info = load_tokenizer(model_weights(path).tokenizer_dir)  # before loading a large model
    own = info.sha256 != data.tokenizer_sha256
    if data_tokenizer is None:
        data_tokenizer = find_data_tokenizer(data, [info])
    documents: dict[str, tuple[list[Document], int]] = {}
    for domain in data.domains:
        found = heldout_documents(data, domain, sequences, data_tokenizer)
        if not found:
            continue
        documents[domain] = reencode(found, info) if own else (found, 0)
        inexact = documents[domain][1]
        if inexact:
            say(
                "eval",
                f"warning: {name} ({path}): {inexact} of {len(found)} held-out documents of domain "
                f"{domain!r} are not reproduced exactly by the model's tokenizer (sha256 {info.sha256[:12]}); "
                "they are scored as it encodes them, bits per byte over the original text",
            )
    if not documents:
        raise DataError(
            f"{data.directory} has no complete held-out document in its first {sequences} held-out "
            "sequences of any domain; raise data.heldout_sequences (and prepare again) or eval.sequences"
        )
    model, tokenizer_dir = load_as_hf(path, dtype=DTYPES[dtype])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    prefix = prefix_token(tokenizer_dir, info)
    domains, pooled = {}, Tally()
    bar = tqdm(documents.items(), desc=f"eval {name}", unit="domain", disable=not progress, file=sys.stderr)
    for domain, (scored, inexact) in bar:
        tally = score_documents(
            model, scored, prefix=prefix, max_len=data.seq_len, micro_batch=micro_batch, device=device
        )
        tally.inexact_documents = inexact
        domains[domain] = tally.summary()
        pooled.add(tally)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": tokenizer_record(info, data),
        "prefix_token": prefix,
        "domains": domains,
        "all": pooled.summary(),
    }
