"""Score one model on the held-out documents of prepared data: cross-entropy, perplexity, bits per byte.

Runs in one process on one device (`cuda` when present) with `transformers`, whatever the model's
origin: an HF directory, or a training checkpoint of any layout (resharded to one process by
`load_as_hf`). Every document is scored with rolling windows (`windows.py`, lm-evaluation-harness's
protocol), so the numbers are those a downstream team gets from lm-eval on the same text.

Per domain: `ce` = summed NLL / predicted tokens (nats), `ppl = exp(ce)`, `bits_per_byte` = summed
NLL / ln 2 / UTF-8 bytes of the documents. `all` pools the domains (tokens and bytes summed).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from distill.data.prepared import PreparedData
from distill.data.tokenizer import TokenizerInfo, load_tokenizer
from distill.errors import DataError
from distill.eval.text import Document, heldout_documents
from distill.eval.windows import Window, rolling_windows
from distill.models.weights import Weights, find_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Tally:
    """Summed NLL (nats) over `tokens` predicted tokens of `documents` documents of `bytes` bytes."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def add(self, other: Tally) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.documents += other.documents

    def summary(self) -> dict[str, Any]:
        ce = self.nll / self.tokens if self.tokens else float("nan")
        return {
            "ce": ce,
            "ppl": math.exp(ce) if self.tokens else float("nan"),
            "bits_per_byte": self.nll / math.log(2) / self.bytes if self.bytes else float("nan"),
            **asdict(self),
        }


def model_weights(path: Path) -> Weights:
    """The weights at `path`, or an error saying what a model path must be."""
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


def check_tokenizer(tokenizer_dir: Path, data: PreparedData, model_path: Path) -> TokenizerInfo:
    """The model's tokenizer, which must be the one the data was prepared with (refused otherwise)."""
    info = load_tokenizer(tokenizer_dir)
    if info.sha256 != data.tokenizer_sha256:
        prepared_with = data.manifest.get("tokenizer", {}).get("path", "another tokenizer")
        raise DataError(
            f"{model_path}: the model's tokenizer ({tokenizer_dir}, sha256 {info.sha256[:12]}) is not the one "
            f"{data.directory} was prepared with ({prepared_with}, sha256 {data.tokenizer_sha256[:12]}); "
            "prepare the held-out data with the model's tokenizer to evaluate it"
        )
    return info


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
    path: Path,
    data: PreparedData,
    *,
    sequences: int,
    dtype: str = "float32",
    micro_batch: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-domain and pooled scores of the model at `path` on `data`'s held-out documents."""
    from distill.models.convert import load_as_hf

    info = check_tokenizer(model_weights(path).tokenizer_dir, data, path)  # before loading a large model
    model, tokenizer_dir = load_as_hf(path, dtype=DTYPES[dtype])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    prefix = prefix_token(tokenizer_dir, info)
    domains, pooled = {}, Tally()
    bar = tqdm(
        data.domains, desc=f"eval {Path(path).name}", unit="domain", disable=not progress, file=sys.stderr
    )
    for domain in bar:
        documents = heldout_documents(data, domain, sequences, info)
        if not documents:
            continue
        tally = score_documents(
            model, documents, prefix=prefix, max_len=data.seq_len, micro_batch=micro_batch, device=device
        )
        domains[domain] = tally.summary()
        pooled.add(tally)
    if not domains:
        raise DataError(
            f"{data.directory} has no complete held-out document in its first {sequences} held-out "
            "sequences of any domain; raise data.heldout_sequences (and prepare again) or eval.sequences"
        )
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "prefix_token": prefix,
        "domains": domains,
        "all": pooled.summary(),
    }
