"""Tokenizers: train a byte-level BPE or a unigram, load any local Hugging Face tokenizer, fingerprint it.

The prepared data, the teacher cache and the student all have to agree on the tokenizer, so every
artifact records `TokenizerInfo.sha256`: a hash of the tokenizer's canonical JSON (vocabulary, merges,
normalizer, pre-tokenizer, special tokens), not of file bytes or paths. Workers receive the JSON and
rebuild a `tokenizers.Tokenizer` from it, which is cheap and avoids importing transformers there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.atomic import atomic_directory, atomic_write_json
from distill.config.data import TokenizerAlgorithm, TokenizerTrainConfig
from distill.config.schema import DataConfig
from distill.data.sources.records import policy_of
from distill.data.sources.resolve import iter_documents, resolve_source
from distill.errors import DataError
from distill.hub import ModelLocation, local_dir
from distill.messages import say
from distill.stage import StageOutput, Status

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<unk>"  # unigram only: byte fallback needs an unknown id, though no text ever encodes to it
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # unigram's byte fallback, SentencePiece's names
TRAINING_RECORD = "distillery_tokenizer.json"
# Unigram: the rarest characters, together this share of the training text's characters, get no piece of
# their own and are encoded as bytes (SentencePiece's `character_coverage` default for large alphabets).
CHARACTER_COVERAGE = 0.9995
# Unigram: the trainer sees no word (run of non-spaces, or of spaces) longer than this: pieces are at most
# 16 characters, and words of some 70k characters (minified code, base64) only cost the trainer memory.
MAX_TRAINING_RUN = 4096
# Unigram: SentencePiece's EM sums over this many fixed slices of the words, on any machine; another
# count would add in another order and give other scores.
UNIGRAM_THREADS = 4
_ALGORITHM_NAMES = {"byte_level_bpe": "byte-level BPE", "unigram": "unigram (byte fallback)"}


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    backend_json: str  # canonical tokenizers.Tokenizer JSON, what workers rebuild from
    eos_id: int
    vocab_size: int  # including added tokens: the embedding rows a model needs at least
    sha256: str


def load_tokenizer(path: ModelLocation) -> TokenizerInfo:
    """Load an HF tokenizer directory (a hub id: its snapshot's tokenizer files); fail with the reason if
    it is unusable for packing."""
    from transformers import AutoTokenizer  # heavy import, only where needed

    path = local_dir(path, weights=False)
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


def train_tokenizer(
    texts: Iterable[str],
    out_dir: Path,
    *,
    algorithm: TokenizerAlgorithm = "byte_level_bpe",
    vocab_size: int,
    min_frequency: int = 2,
    overwrite: bool = False,
    record: dict[str, Any] | None = None,
) -> TokenizerInfo:
    """Train a tokenizer on `texts` and save it as a HF tokenizer directory, atomically.

    Either algorithm gives the same kind of directory (`<|endoftext|>` as eos and bos, `<|pad|>`,
    TRAINING_RECORD written inside the atomic directory), so `load_tokenizer` and every later stage
    treat them alike. `min_frequency` applies to byte_level_bpe only (the unigram trainer has none).
    """
    if algorithm == "byte_level_bpe":
        tokenizer = _train_byte_level_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    elif algorithm == "unigram":
        tokenizer = _train_unigram(texts, vocab_size=vocab_size)
    else:
        raise DataError(f"unknown tokenizer algorithm {algorithm!r}; valid: byte_level_bpe, unigram")
    if not record:
        record = {"algorithm": algorithm, "vocab_size": vocab_size, "min_frequency": min_frequency}
    return _save_tokenizer(tokenizer, Path(out_dir), overwrite=overwrite, record=record)


def _save_tokenizer(
    tokenizer: Tokenizer, out_dir: Path, *, overwrite: bool, record: dict[str, Any]
) -> TokenizerInfo:
    """Wrap `tokenizer` as a PreTrainedTokenizerFast and write it with its training record, atomically:
    the record is what makes the stage complete, so it must never exist beside a half-written tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        hf.save_pretrained(str(tmp))
        atomic_write_json(tmp / TRAINING_RECORD, record)
    return load_tokenizer(out_dir)


def _train_byte_level_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int) -> Tokenizer:
    """GPT-2-style BPE over bytes: lossless on any UTF-8 because every byte is in the alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
    return tokenizer


def _train_unigram(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """A SentencePiece-style unigram with byte fallback, lossless on any text but U+2581 (`▁`).

    No normalizer and no space prepended (Metaspace `prepend_scheme="never"`, after a split into
    words), so decoding gives back exactly the text: spaces become `▁` and back. Characters without a piece (unseen, or too rare to
    get one, see CHARACTER_COVERAGE) are encoded as their UTF-8 bytes, `<0x00>`..`<0xFF>`; a literal
    `▁` in the text is indistinguishable from a space and decodes as one (as in SentencePiece).

    The pieces and their scores come from SentencePiece's unigram trainer, given the words (what the
    pre-tokenizer makes of the texts) with their counts, sorted. `tokenizers`' own UnigramTrainer is
    not reproducible: its EM sums over a hash map in a per-process random order (and over a number of
    chunks that depends on the thread count), so two trainings of the same corpus gave pieces at other
    ids and scores up to 0.006 apart. SentencePiece's sums run in the input's order over a fixed number
    of threads (UNIGRAM_THREADS, whatever the machine), so the same corpus gives the same file.

    The model is then built here: ids 0..2 `<|endoftext|>`, `<|pad|>`, `<unk>`, ids 3..258 the byte
    tokens, then the learned pieces, `vocab_size` in all, with `byte_fallback=True` and `<unk>` as the
    unknown id (fallback only replaces what the Viterbi search marks unknown, and that needs an unknown id).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    reserved = [EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *BYTE_TOKENS]
    # Words keep the one space before them (`▁word`); a longer run of spaces is a word of its own less
    # that space (`▁▁▁`, `▁return`). Metaspace alone would split before every space, and indented code
    # would spend a token per space (about half of all tokens in the demo code domain).
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?[^ ]+| +(?![^ ])"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),
        ]
    )
    # Unlike SentencePiece, tokenizers matches the byte tokens and <unk> against the text like any
    # piece, so "<0x41>" in a text could come back as "A". Their score (below) loses to the same text
    # spelled out by ordinary pieces, as long as each of its characters has one: hence this alphabet.
    alphabet = sorted(set("".join(reserved)))
    kept, characters = _training_strings(texts, keep=set(alphabet))
    if not characters:
        raise DataError("tokenizer training saw no text")
    words: Counter[str] = Counter()
    for text in kept:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    try:
        learned = _sentencepiece_pieces(words, vocab_size=vocab_size - len(reserved), required=alphabet)
    except RuntimeError as exc:  # SentencePiece's failed checks, e.g. more characters than pieces
        raise DataError(
            f"unigram training failed ({exc}): the text has {characters} distinct characters "
            f"(after dropping the rarest); vocab_size {vocab_size} keeps {len(reserved)} tokens "
            f"for specials and bytes, so it may be too small"
        ) from None
    names = set(reserved)
    learned = [
        (piece, score)
        for piece, score in learned
        if piece not in names and not _looks_like_byte_token(piece.replace("▁", " "))
    ]
    lowest = min([score for _, score in learned] + [-1.0])
    # Far below any path of ordinary pieces through a reserved name (at most 13 characters).
    never = 100.0 * lowest
    model = models.Unigram(
        [(token, never) for token in reserved] + learned, unk_id=reserved.index(UNK_TOKEN), byte_fallback=True
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    if not json.loads(tokenizer.to_str())["model"].get("byte_fallback"):
        raise DataError("tokenizers built the unigram without byte fallback; this version is unsupported")
    return tokenizer


def _sentencepiece_pieces(
    words: Counter[str], *, vocab_size: int, required: list[str]
) -> list[tuple[str, float]]:
    """SentencePiece's unigram pieces (and log-probability scores) for `words`, `vocab_size` at most.

    The words go in as a TSV of `word<TAB>count`, sorted by count then word. What SentencePiece would
    not take as text stands in as private-use characters the text does not use, put back in the
    pieces: tabs, newlines and carriage returns (the format's separators) and U+2585 (its internal
    unknown character: a word holding it is dropped). Its unknown piece is one more such character,
    so a literal `<unk>` in the text is text. Every option that would split or normalise differently
    from the pre-tokenizer is off: a piece may be any substring of a word, whitespace runs included.
    """
    import sentencepiece

    used = {char for word in words for char in word}
    spare = (chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in used)  # plane 15, private use
    stand_in = {char: next(spare) for char in "\t\n\r\u2585"}
    unknown_piece = next(spare)
    escape = str.maketrans(stand_in)
    restore = str.maketrans({v: k for k, v in stand_in.items()})
    with tempfile.TemporaryDirectory(prefix="distillery-unigram-") as tmp:
        listing = Path(tmp) / "words.tsv"
        with listing.open("w", encoding="utf-8") as out:
            for word, count in sorted(words.items(), key=lambda item: (-item[1], item[0])):
                out.write(f"{word.translate(escape)}\t{count}\n")
        sentencepiece.SentencePieceTrainer.train(
            input=str(listing),
            input_format="tsv",
            model_prefix=str(Path(tmp) / "unigram"),
            model_type="unigram",
            vocab_size=vocab_size + 1,  # its own <unk> counts in
            hard_vocab_limit=False,  # a small corpus may have fewer pieces to give
            character_coverage=1.0,  # the rarest characters are already cut out
            required_chars="".join(required),
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_by_whitespace=False,
            split_by_unicode_script=False,
            split_by_number=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=8 * MAX_TRAINING_RUN,
            byte_fallback=False,
            unk_id=0,
            unk_piece=unknown_piece,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=UNIGRAM_THREADS,
            minloglevel=2,
        )
        processor = sentencepiece.SentencePieceProcessor(model_file=str(Path(tmp) / "unigram.model"))
        return [
            (processor.id_to_piece(i).translate(restore), float(processor.get_score(i)))
            for i in range(processor.get_piece_size())
            if not processor.is_unknown(i)
        ]


def _looks_like_byte_token(piece: str) -> bool:
    """Whether the ByteFallback decoder reads `piece` as a byte (its test: 6 UTF-8 bytes, `<0x`..`>`,
    the middle parsed as hex, which also accepts lowercase and a `+` sign): a learned piece like that,
    from text such as `<0x0a>`, would decode as one byte instead of its text, so it is not kept."""
    return len(piece.encode()) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _training_strings(texts: Iterable[str], *, keep: set[str]) -> tuple[list[str], int]:
    """What the unigram trainer is given: the texts cut around their rarest characters and inside runs
    longer than MAX_TRAINING_RUN; and how many distinct characters remain.

    The unigram trainer gives every character it sees a piece, so a corpus with thousands of rare
    characters (CJK, symbols) would spend the vocabulary on them or fail to train; with byte fallback
    they need no piece. Characters outside `keep` that together make up the last 1 - CHARACTER_COVERAGE
    of the character count are cut out (the text on each side trains on as separate strings, which is
    how an encoded text is segmented around them too). Texts are held in memory for the two passes.
    """
    kept = [t for t in texts if t]
    counts: Counter[str] = Counter()
    for text in kept:
        counts.update(text)
    counts.pop(" ", None)  # becomes `▁`, the commonest piece
    total, covered, rare = sum(counts.values()), 0, []
    for char, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if covered >= CHARACTER_COVERAGE * total and char not in keep:
            rare.append(char)
        covered += count
    if rare:
        pattern = re.compile("[" + "".join(re.escape(c) for c in rare) + "]+")
        kept = [part for text in kept for part in pattern.split(text) if part]
    long_run = re.compile(f"[^ ]{{{MAX_TRAINING_RUN}}}| {{{MAX_TRAINING_RUN}}}")
    cut = []
    for text in kept:
        start = 0
        for match in long_run.finditer(text):
            cut.append(text[start : match.end()])
            start = match.end()
        if start < len(text):
            cut.append(text[start:])
    return cut, len(counts) - len(rare)


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
        record=TRAINING_RECORD,
        spec_field=None,
        foreign_hint="remove data.tokenizer.train to use it as it is, or pass --overwrite to train over it",
    )
    if output.check(overwrite=overwrite) is Status.COMPLETE:
        say("tokenizer", f"{settings.path} is complete, nothing to do")
        return load_tokenizer(settings.path)
    texts = _training_texts(data, settings.train.max_bytes_per_domain)
    kind = _ALGORITHM_NAMES[settings.train.algorithm]
    say("tokenizer", f"training a {kind} of {settings.train.vocab_size} tokens")
    info = train_tokenizer(
        texts,
        settings.path,
        algorithm=settings.train.algorithm,
        vocab_size=settings.train.vocab_size,
        min_frequency=settings.train.min_frequency,
        overwrite=overwrite or settings.path.exists(),  # checked above: replaced, or an empty directory
        record=wanted,
    )
    say("tokenizer", f"saved {settings.path} (sha256 {info.sha256[:12]})")
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
    return {**_train_settings(data.tokenizer.train), "domains": domains}


def _train_settings(train: TokenizerTrainConfig) -> dict[str, Any]:
    """`data.tokenizer.train` as the record keeps it."""
    return train.model_dump(mode="json")


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
