"""Tokenizers: train a byte-level BPE, load any local Hugging Face tokenizer, fingerprint it.

The prepared data, the teacher cache and the student all have to agree on the tokenizer, so every
artifact records `TokenizerInfo.sha256`: a hash of the tokenizer's canonical JSON (vocabulary, merges,
normalizer, pre-tokenizer, special tokens), not of file bytes or paths. Workers receive the JSON and
rebuild a `tokenizers.Tokenizer` from it, which is cheap and avoids importing transformers there.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.atomic import atomic_directory, atomic_write_json
from distill.config.schema import DataConfig
from distill.data.records import policy_of
from distill.data.sources import iter_documents, resolve_source
from distill.errors import DataError
from distill.stage import StageOutput, Status

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TRAINING_RECORD = "distillery_tokenizer.json"


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    backend_json: str  # canonical tokenizers.Tokenizer JSON, what workers rebuild from
    eos_id: int
    vocab_size: int  # including added tokens: the embedding rows a model needs at least
    sha256: str


def load_tokenizer(path: Path) -> TokenizerInfo:
    """Load a local HF tokenizer directory; fail with the reason if it is unusable for packing."""
    from transformers import AutoTokenizer  # heavy import, only where needed

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken directory
        raise DataError(f"tokenizer directory {path} does not load with AutoTokenizer: {exc}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(
            f"tokenizer at {path} has no fast (tokenizers) backend; convert it to tokenizer.json first"
        )
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer at {path} defines no eos_token; packing needs one to separate documents")
    backend_json = backend.to_str()
    canonical = json.dumps(json.loads(backend_json), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return TokenizerInfo(path, backend_json, int(tok.eos_token_id), len(tok), digest)


def train_byte_level_bpe(
    texts: Iterable[str],
    out_dir: Path,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    overwrite: bool = False,
    record: dict[str, Any] | None = None,
) -> TokenizerInfo:
    """Train a byte-level BPE on `texts` and save it as a HF tokenizer directory, atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() < 256 + 2:
        raise DataError("tokenizer training saw no text")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        hf.save_pretrained(str(tmp))
        atomic_write_json(
            tmp / TRAINING_RECORD, record or {"vocab_size": vocab_size, "min_frequency": min_frequency}
        )
    return load_tokenizer(Path(out_dir))


def ensure_tokenizer(data: DataConfig, *, overwrite: bool = False) -> TokenizerInfo:
    """The campaign's tokenizer stage: train into `data.tokenizer.path` unless it is already there.

    With `data.tokenizer.train` unset, the directory must hold a loadable tokenizer. With it set, the
    directory is trained once; a directory trained with other settings (or not by us) is refused.
    """
    settings = data.tokenizer
    if settings.train is None:
        return load_tokenizer(settings.path)
    wanted = _training_record(data)
    output = StageOutput(
        "tokenizer",
        settings.path,
        "data.tokenizer.path",
        wanted,
        legacy_specs=(_legacy_training_record(data),),
        record=TRAINING_RECORD,
        spec_field=None,
        foreign_hint="remove data.tokenizer.train to use it as it is, or pass --overwrite to train over it",
    )
    if output.check(overwrite=overwrite) is Status.COMPLETE:
        print(f"tokenizer: {settings.path} is complete, nothing to do", file=sys.stderr)
        return load_tokenizer(settings.path)
    texts = _training_texts(data, settings.train.max_bytes_per_domain)
    print(f"tokenizer: training a byte-level BPE of {settings.train.vocab_size} tokens", file=sys.stderr)
    info = train_byte_level_bpe(
        texts,
        settings.path,
        vocab_size=settings.train.vocab_size,
        min_frequency=settings.train.min_frequency,
        overwrite=overwrite or settings.path.exists(),  # checked above: replaced, or an empty directory
        record=wanted,
    )
    print(f"tokenizer: saved {settings.path} (sha256 {info.sha256[:12]})", file=sys.stderr)
    return info


def _training_record(data: DataConfig) -> dict[str, Any]:
    """What the tokenizer was trained on, without a path: file sources by their names below the glob's
    fixed directory and their sizes, so a corpus moved elsewhere needs no retraining."""
    assert data.tokenizer.train is not None
    domains = {}
    for name, domain in data.domains.items():
        described = []
        for i, source in enumerate(domain.sources):
            entry = source.model_dump(mode="json")
            if source.files is not None:
                resolved = resolve_source(source, f"data.domains.{name}.sources[{i}]")
                entry["files"] = [
                    [n, os.path.getsize(f)] for n, f in zip(resolved.names, resolved.files, strict=True)
                ]
            described.append(entry)
        domains[name] = described
    return {**data.tokenizer.train.model_dump(mode="json"), "domains": domains}


def _legacy_training_record(data: DataConfig) -> dict[str, Any]:
    """The record of distillery <= 0.2 (absolute globs): its tokenizers of this config are complete."""
    assert data.tokenizer.train is not None
    return {
        **data.tokenizer.train.model_dump(mode="json"),
        "domains": {name: [s.model_dump(mode="json") for s in d.sources] for name, d in data.domains.items()},
    }


def _training_texts(data: DataConfig, max_bytes_per_domain: int) -> Iterator[str]:
    """Up to `max_bytes_per_domain` of text from each domain, streamed, so domains weigh alike."""
    for name, domain in data.domains.items():
        taken = 0
        for i, source in enumerate(domain.sources):
            resolved = resolve_source(source, f"data.domains.{name}.sources[{i}]")
            for text in iter_documents(resolved, policy_of(data)):
                yield text
                taken += len(text.encode("utf-8", "surrogatepass"))
                if taken >= max_bytes_per_domain:
                    break
            if taken >= max_bytes_per_domain:
                break
