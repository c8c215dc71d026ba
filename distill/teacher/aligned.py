"""A teacher with another tokenizer (ULD): what its cached and live sources share (the alignment).

The data was prepared paired (`distill/data/pairing/pairs.py`): every student sequence also exists in the
teacher's tokens, with both tokenizations' byte offsets. For each micro-batch a source reads the
offsets and maps every student position to its teacher position (`distill/data/pairing/alignment.py`,
`loss.uld.alignment`), then gives the teacher's signal over the teacher sequences:

- **cached** (`aligned_cached.py`): the top-k cache the cache stage wrote over the teacher sequences
  (kept values and the tail mass, spread over the unkept ids by the loss), read ahead of each step;
- **online** (`aligned_online.py`): the live teacher, sharded like the student over its own vocabulary,
  run forward on the teacher sequences; the loss takes its per-shard top m at the aligned positions.

`Alignment` is the part both use: each micro-batch's positions and spans, the teacher's tokens.

Hybrid ULD (`loss.uld.hybrid`) needs the ids whose token bytes are identical in both vocabularies
(`vocab_match`); with none, it warns with the count and uses the plain sorted L1. The span term
(`loss.weights.span`) also gets the byte-aligned spans of each micro-batch and the teacher's
log-likelihood of each (the cache's target log-probs, or the live teacher's), `distill/losses/span.py`.

Held-out cross-entropy (DDK's reference, the teacher's logged numbers) is the teacher's summed NLL
over its real tokens of the same text, counted per *student* token: so the teacher's "perplexity"
and bits per byte compare with the student's over the same bytes (up to the first token of each side
and the truncated teacher tail).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from distill.cache.reader import CacheReader, SequenceKey
from distill.config import CampaignConfig
from distill.config.loss import CROSS_TOKENIZER_TERMS
from distill.data.pairing.alignment import align_rows, span_groups
from distill.data.prepared import PreparedData
from distill.data.token_text import BYTE_FALLBACK_PIECE, token_text
from distill.data.tokenizer import load_tokenizer
from distill.engine.base import Engine
from distill.errors import DataError
from distill.losses.projection import VocabProjection
from distill.losses.signal import SpanTargets
from distill.losses.uld import VocabMatch
from distill.messages import say
from parallel.vocab import VocabShard

Spans = tuple[np.ndarray, np.ndarray, int]  # student rows' spans, teacher rows' spans, count (span_groups)


def vocab_match(
    student_dir: Any, teacher_dir: Any, shard: VocabShard, teacher_vocab: int, device: torch.device
) -> VocabMatch:
    """Ids whose token bytes are identical in both tokenizers (first id per byte string), EOS with EOS."""
    student_info, teacher_info = load_tokenizer(student_dir), load_tokenizer(teacher_dir)
    student, teacher = token_text(student_info), token_text(teacher_info)
    first: dict[bytes, int] = {}
    for t_id, piece in enumerate(teacher.pieces):
        if piece and piece not in first:
            first[piece] = t_id
    pairs = {student_info.eos_id: teacher_info.eos_id}
    taken = {teacher_info.eos_id}
    for s_id, piece in enumerate(student.pieces):
        t_id = first.get(piece) if piece else None
        if t_id is not None and t_id not in taken and s_id not in pairs:
            pairs[s_id] = t_id
            taken.add(t_id)
    to_student = torch.full((teacher_vocab,), -1, dtype=torch.long)
    mask = torch.zeros(shard.start + shard.size, dtype=torch.bool)
    for s_id, t_id in pairs.items():
        if t_id < teacher_vocab:
            to_student[t_id] = s_id
            if s_id < len(mask):
                mask[s_id] = True
    return VocabMatch(mask[shard.start :].to(device), to_student.to(device), int((to_student >= 0).sum()))


def vocab_projection(
    student_dir: Any, teacher_dir: Any, teacher_vocab: int, device: torch.device
) -> VocabProjection:
    """Each teacher id's student id for `projected_kl`: the student token with the same bytes, else the
    longest student token whose bytes begin the teacher token's, else -1; EOS goes to EOS.

    The student's ordinary pieces come first: a byte-fallback student (SentencePiece, our unigram) also
    has `<0xNN>` tokens, which it emits only for characters without a piece of their own, so a byte
    token is a target only for a byte no piece spells (a teacher token that begins inside a UTF-8
    character). The unknown token is never a target."""
    student_info, teacher_info = load_tokenizer(student_dir), load_tokenizer(teacher_dir)
    student, teacher = token_text(student_info), token_text(teacher_info)
    model = json.loads(student_info.backend_json).get("model", {})
    unknown = model.get("unk_id") if model.get("type") == "Unigram" else None
    byte_tokens = _byte_token_ids(model)
    by_bytes: dict[bytes, int] = {}
    for ordinary in (True, False):
        for s_id, piece in enumerate(student.pieces):
            if piece and s_id != unknown and (s_id in byte_tokens) != ordinary and piece not in by_bytes:
                by_bytes[piece] = s_id
    longest = max((len(piece) for piece in by_bytes), default=0)
    to_student = torch.full((teacher_vocab,), -1, dtype=torch.long)
    exact = prefix = 0
    for t_id, piece in enumerate(teacher.pieces[:teacher_vocab]):
        if t_id == teacher_info.eos_id:
            to_student[t_id] = student_info.eos_id
            exact += 1
            continue
        for length in range(min(len(piece), longest), 0, -1):
            s_id = by_bytes.get(piece[:length])
            if s_id is not None:
                to_student[t_id] = s_id
                exact, prefix = (exact + 1, prefix) if length == len(piece) else (exact, prefix + 1)
                break
    return VocabProjection(to_student.to(device), exact, prefix, teacher_vocab - exact - prefix)


def _byte_token_ids(model: dict[str, Any]) -> set[int]:
    """The ids of a tokenizer model's byte-fallback tokens (`<0x00>`..`<0xFF>`), none without fallback."""
    if not model.get("byte_fallback"):
        return set()
    vocab = model.get("vocab", [])
    names = [entry[0] for entry in vocab] if isinstance(vocab, list) else sorted(vocab, key=vocab.get)
    return {i for i, name in enumerate(names) if BYTE_FALLBACK_PIECE.match(name)}


def usable_match(match: VocabMatch) -> VocabMatch | None:
    """`match` for hybrid ULD, or None (a warning with the count) when nothing but EOS matched."""
    if match.count <= 1:
        say(
            "train",
            f"warning: loss.uld.hybrid: {match.count} token(s) have identical text in both vocabularies; "
            "using the sorted L1 over all ids",
        )
        return None
    say("train", f"hybrid ULD: {match.count:,} ids matched by their text")
    return match


class Alignment:
    """What both cross-tokenizer sources share: each micro-batch's student -> teacher positions (and
    byte-aligned spans), the teacher's tokens of its sequences, the vocabulary match of hybrid ULD."""

    def __init__(
        self, config: CampaignConfig, data: PreparedData, engine: Engine, vocab: int, teacher_tokenizer: Any
    ) -> None:
        self.data, self.device = data, engine.device
        self.teacher_data = PreparedData(data.directory, side="teacher")
        self.mode = config.loss.uld.alignment
        self.terms = [name for name in CROSS_TOKENIZER_TERMS if getattr(config.loss.weights, name) > 0]
        self.spans = config.loss.weights.span > 0  # span-likelihood matching (`distill/losses/span.py`)
        self.vocab = vocab
        self.teacher_shard = engine.shard.sibling(vocab)
        self.match: VocabMatch | None = None
        if config.loss.uld.hybrid and config.loss.weights.uld > 0:
            match = vocab_match(engine.tokenizer_dir, teacher_tokenizer, engine.shard, vocab, self.device)
            self.match = usable_match(match)
        self.projection: VocabProjection | None = None
        if config.loss.weights.projected_kl > 0:
            self.projection = vocab_projection(engine.tokenizer_dir, teacher_tokenizer, vocab, self.device)
            say(
                "train",
                f"vocabulary projection: {self.projection.exact:,} teacher ids by identical bytes, "
                f"{self.projection.prefix:,} by their longest student prefix, {self.projection.unmapped:,} "
                "unmapped (their mass joins the tail)",
            )

    def offsets(self, keys: list[SequenceKey]) -> np.ndarray:
        """The offset rows of `keys`, in order: one read per (domain, split), not one per sequence."""
        groups: dict[tuple[str, str], list[int]] = {}
        for n, (domain, split, _) in enumerate(keys):
            groups.setdefault((domain, split), []).append(n)
        rows: list[np.ndarray] = [np.empty(0)] * len(keys)
        for (domain, split), members in groups.items():
            batch = self.data.offsets(domain, np.asarray([keys[n][2] for n in members]), split)  # type: ignore[arg-type]
            for n, row in zip(members, batch, strict=True):
                rows[n] = row
        return np.stack(rows)

    def rows(self, keys: list[SequenceKey]) -> tuple[np.ndarray, Spans | None]:
        """One micro-batch's teacher position of every student row (-1: none), and its spans."""
        offsets = self.offsets(keys)
        index = align_rows(offsets, self.data.seq_len + 1, self.teacher_data.seq_len + 1, self.mode)
        spans = (
            span_groups(offsets, self.data.seq_len + 1, self.teacher_data.seq_len + 1) if self.spans else None
        )
        return index, spans

    def _teacher_rows(self, keys: list[SequenceKey]) -> np.ndarray:
        rows = [self.teacher_data.sequence(d, i, s) for d, s, i in keys]  # type: ignore[arg-type]
        return np.stack(rows)  # [b, T + 1]

    def teacher_tokens(self, keys: list[SequenceKey]) -> torch.Tensor:
        return torch.from_numpy(self._teacher_rows(keys)).to(self.device)  # [b, T + 1]

    def teacher_next(self, keys: list[SequenceKey]) -> np.ndarray | None:
        """The teacher's own next token at each of its positions `[b * T]` (the projection's in-context
        mapping), None without the projection."""
        if self.projection is None:
            return None
        return self._teacher_rows(keys)[:, 1:].astype(np.int64).reshape(-1)

    def lengths(self, keys: list[SequenceKey]) -> np.ndarray:
        return self.offsets(keys)[:, 0].astype(np.int64)  # teacher tokens per sequence

    def span_targets(self, spans: Spans | None, teacher_logprobs: torch.Tensor | None) -> SpanTargets | None:
        """The span term's targets: each student row's span `[b * S]`, the teacher's log-likelihood of
        each span `[G]` (sum of its log-probs `[b * T]` of the tokens in the span)."""
        if spans is None or teacher_logprobs is None:
            return None
        student_span, teacher_span, count = spans
        teacher_span_t = torch.from_numpy(teacher_span).to(self.device)
        inside = teacher_span_t >= 0
        teacher_ll = torch.zeros(count, dtype=torch.float64, device=self.device).index_add_(
            0, teacher_span_t[inside], teacher_logprobs.reshape(-1)[inside].double()
        )
        return SpanTargets(torch.from_numpy(student_span).to(self.device), teacher_ll)

    def description(self, kind: str) -> str:
        return f"{kind}, another tokenizer: {' + '.join(self.terms) or 'no term'}, {self.mode} alignment"


def check_pairing(config: CampaignConfig, data: PreparedData) -> None:
    """The teacher/loss combination fits the prepared data (which knows whether the tokenizers differ)."""
    weights = config.loss.weights
    same_vocab = [name for name in weights.kd_terms() if name not in CROSS_TOKENIZER_TERMS]
    cross = [f"loss.weights.{name}" for name in weights.kd_terms() if name in CROSS_TOKENIZER_TERMS]
    if cross and not data.paired:
        raise DataError(
            f"{', '.join(cross)}: the teacher's tokenizer is the student's ({data.directory} was prepared "
            "without a teacher of another tokenizer): plain KD applies (loss.weights.forward_kl, or taid, "
            "jsd, ...), which compares the two distributions id by id"
        )
    if data.paired and same_vocab:
        raise DataError(
            f"{', '.join(f'loss.weights.{n}' for n in same_vocab)}: the teacher's tokenizer is not the "
            f"student's ({data.directory} is paired with the teacher's tokens); use loss.weights.uld, projected_kl or span"
        )


def open_aligned_cache(directory: Any, data: PreparedData) -> CacheReader:
    """The teacher cache over the paired teacher sequences, refused if it was built over others."""
    from distill.cache.reader import read_cache_manifest

    spec = read_cache_manifest(directory)["spec"]
    pairing = data.manifest["spec"]["pairing"]
    if spec.get("pairing") != pairing:
        built = spec.get("pairing") or {"teacher_tokenizer_sha256": spec["tokenizer_sha256"]}
        raise DataError(
            f"teacher cache {directory} was built over another pairing (teacher tokenizer "
            f"{str(built.get('teacher_tokenizer_sha256'))[:12]}, teacher_seq_len {built.get('teacher_seq_len')}); "
            f"{data.directory} pairs with teacher tokenizer {pairing['teacher_tokenizer_sha256'][:12]}, "
            f"teacher_seq_len {pairing['teacher_seq_len']}: rebuild it (`distillery cache CONFIG --overwrite`)"
        )
    teacher_side = PreparedData(data.directory, side="teacher")
    return CacheReader(
        directory, prepared=teacher_side, tokenizer_sha256=teacher_side.tokenizer_sha256, vocab_size=1 << 62
    )
