"""A teacher with another tokenizer (ULD): its signal at the student's positions, cached or live.

The data was prepared paired (`distill/data/pairing.py`): every student sequence also exists in the
teacher's tokens, with both tokenizations' byte offsets. For each micro-batch this source reads the
offsets and maps every student position to its teacher position (`distill/data/alignment.py`,
`loss.uld.alignment`), then gives the teacher's signal over the teacher sequences:

- **cached**: the top-k cache the cache stage wrote over the teacher sequences (kept values and the
  tail mass, spread over the unkept ids by the loss), read ahead of each step like `CachedSource`;
- **online**: the live teacher, sharded like the student over its own vocabulary, run forward on the
  teacher sequences; the loss takes its per-shard top m at the aligned positions chunk by chunk.

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

import sys
from typing import Any

import numpy as np
import torch

from distill.cache.reader import CacheReader, SequenceKey
from distill.config import CampaignConfig
from distill.config.loss import CROSS_TOKENIZER_TERMS
from distill.data.alignment import align_rows, span_groups
from distill.data.prepared import PreparedData
from distill.data.token_text import token_text
from distill.data.tokenizer import load_tokenizer
from distill.engine.base import Engine, ForwardModel
from distill.errors import DataError
from distill.losses.fused import Terms, chunked_loss, label_logprobs
from distill.losses.signal import AlignedSignal, TeacherSignal
from distill.losses.uld import VocabMatch
from distill.teacher.source import MicroBatch, ReadAhead
from parallel.vocab import VocabShard

Spans = tuple[np.ndarray, np.ndarray, int]  # student rows' spans, teacher rows' spans, count (span_groups)
Rows = list[tuple[np.ndarray, Spans | None, dict[str, torch.Tensor] | None]]  # per micro-batch
LIVE_CHUNK = 1024  # teacher tokens per chunk of its label log-probs (span term, live teacher)


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


def usable_match(match: VocabMatch, *, speak: bool) -> VocabMatch | None:
    """`match` for hybrid ULD, or None (a warning with the count) when nothing but EOS matched."""
    if match.count <= 1:
        print(
            f"train: warning: loss.uld.hybrid: {match.count} token(s) have identical text in both vocabularies; "
            "using the sorted L1 over all ids",
            file=sys.stderr,
        )
        return None
    if speak:
        print(f"train: hybrid ULD: {match.count:,} ids matched by their text", file=sys.stderr)
    return match


class AlignedSource:
    def __init__(
        self,
        config: CampaignConfig,
        data: PreparedData,
        engine: Engine,
        *,
        reader: CacheReader | None = None,
        model: ForwardModel | None = None,
        teacher_tokenizer: Any = None,
    ) -> None:
        self.data, self.engine, self.device = data, engine, engine.device
        self.teacher_data = PreparedData(data.directory, side="teacher")
        self.alignment = config.loss.uld.alignment
        self.spans = config.loss.weights.span > 0  # span-likelihood matching (`distill/losses/span.py`)
        self.reader, self.model = reader, model
        self.vocab = (
            int(reader.manifest["spec"]["teacher_vocab_size"]) if reader is not None else model.vocab_size
        )  # type: ignore[union-attr]
        self.teacher_shard = engine.shard.sibling(self.vocab)
        self.arch = model.arch if model is not None else None
        self.active = engine.loss_rank
        self.match: VocabMatch | None = None
        if config.loss.uld.hybrid and config.loss.weights.uld > 0:
            match = vocab_match(
                engine.tokenizer_dir, teacher_tokenizer, engine.shard, self.vocab, self.device
            )
            self.match = usable_match(match, speak=engine.is_main)
        kind = f"cache {reader.directory} (top-k)" if reader is not None else "online teacher"
        self.description = f"{kind}, another tokenizer: ULD, {self.alignment} alignment"
        self._ahead: ReadAhead[list[list[SequenceKey]], Rows] | None = (
            ReadAhead(self._read, "aligned-read") if self.active else None
        )

    # -- what the teacher sees --------------------------------------------------------------------

    def _offsets(self, keys: list[SequenceKey]) -> np.ndarray:
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

    def _teacher_tokens(self, keys: list[SequenceKey]) -> torch.Tensor:
        rows = [self.teacher_data.sequence(d, i, s) for d, s, i in keys]  # type: ignore[arg-type]
        return torch.from_numpy(np.stack(rows)).to(self.device)  # [b, T + 1]

    def _spans(self, offsets: np.ndarray) -> Spans | None:
        if not self.spans:
            return None
        return span_groups(offsets, self.data.seq_len + 1, self.teacher_data.seq_len + 1)

    def _read(self, keys: list[list[SequenceKey]]) -> Rows:
        rows: Rows = []
        for m in keys:
            offsets = self._offsets(m)
            index = align_rows(offsets, self.data.seq_len + 1, self.teacher_data.seq_len + 1, self.alignment)
            rows.append(
                (index, self._spans(offsets), self.reader.batch(m) if self.reader is not None else None)
            )
        return rows

    def _span_tensors(
        self, spans: Spans | None, teacher_logprobs: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The signal's span fields: each student row's span `[b * S]`, the teacher's log-likelihood of
        each span `[G]` (sum of its log-probs `[b * T]` of the tokens in the span)."""
        if spans is None or teacher_logprobs is None:
            return {}
        student_span, teacher_span, count = spans
        teacher_span_t = torch.from_numpy(teacher_span).to(self.device)
        inside = teacher_span_t >= 0
        teacher_ll = torch.zeros(count, dtype=torch.float64, device=self.device).index_add_(
            0, teacher_span_t[inside], teacher_logprobs.reshape(-1)[inside].double()
        )
        return {"span_student": torch.from_numpy(student_span).to(self.device), "span_teacher": teacher_ll}

    # -- the protocol -----------------------------------------------------------------------------

    def signals(self, micro_batches: list[MicroBatch]) -> list[TeacherSignal | None]:
        if self.model is not None:  # collective: every rank runs the teacher
            tokens = [self._teacher_tokens(m.keys) for m in micro_batches]
            live = self.model.forward(tokens, lambda i, hidden, weight, labels: (hidden, weight))
        if self._ahead is None:
            return [None] * len(micro_batches)
        rows = self._ahead.get([m.keys for m in micro_batches])
        out: list[TeacherSignal | None] = []
        for m, (index_np, spans, cached) in enumerate(rows):
            index = torch.from_numpy(index_np).to(self.device)
            if cached is not None:
                flat = {k: v.reshape(-1, *v.shape[2:]).to(self.device) for k, v in cached.items()}
                out.append(
                    AlignedSignal(
                        index,
                        self.vocab,
                        self.match,
                        ids=flat["ids"].long(),
                        kept_logprobs=flat["logprobs"],
                        tail=flat["tail"],
                        **self._span_tensors(spans, flat["target_logprob"]),
                    )
                )
            else:
                hidden, weight = live[m]
                hidden = hidden.reshape(-1, hidden.shape[-1])  # [b * T, h_t]
                logprobs = None
                if spans is not None:  # the teacher's log-probs of its own next tokens  [b * T]
                    labels = tokens[m][:, 1:].reshape(-1)
                    logprobs = label_logprobs(hidden, weight, labels, self.teacher_shard, LIVE_CHUNK)
                out.append(
                    AlignedSignal(
                        index,
                        self.vocab,
                        self.match,
                        hidden=hidden,
                        weight=weight,  # [V_t/tp, h_t]
                        teacher_shard=self.teacher_shard,
                        **self._span_tensors(spans, logprobs),
                    )
                )
        return out

    def read_ahead(self, keys: list[list[SequenceKey]]) -> None:
        if self._ahead is not None:
            self._ahead.start(keys)

    def _lengths(self, keys: list[SequenceKey]) -> np.ndarray:
        return self._offsets(keys)[:, 0].astype(np.int64)  # teacher tokens per sequence

    def cross_entropy(self, micro_batches: list[MicroBatch]) -> list[tuple[float, int] | None]:
        """Per micro-batch: the teacher's NLL over its real tokens, and the student tokens of that text."""
        student_tokens = [len(m.keys) * self.data.seq_len for m in micro_batches]
        if self.model is not None:
            tokens = [self._teacher_tokens(m.keys) for m in micro_batches]
            lengths = [self._lengths(m.keys) for m in micro_batches]
            terms = Terms(weights={"ce": 1.0})

            def score(index: int, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> float:
                real = torch.arange(labels.shape[1], device=labels.device) < torch.from_numpy(
                    lengths[index] - 1
                ).to(labels.device).unsqueeze(-1)  # [b, T] positions predicting a real token
                result = chunked_loss(
                    hidden[real], weight, labels[real], terms=terms, shard=self.teacher_shard, need_grad=False
                )
                return float(result.loss_sum)

            nll = self.model.forward(tokens, score)
            return [None if v is None else (v, n) for v, n in zip(nll, student_tokens, strict=True)]
        if not self.active:
            return [None] * len(micro_batches)
        assert self.reader is not None
        out: list[tuple[float, int] | None] = []
        for m, count in zip(micro_batches, student_tokens, strict=True):
            lengths = self._lengths(m.keys)
            nll = sum(
                -float(self.reader.sequence(key)["target_logprob"][: n - 1].astype(np.float64).sum())
                for key, n in zip(m.keys, lengths.tolist(), strict=True)
            )
            out.append((nll, count))
        return out

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()


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
            f"student's ({data.directory} is paired with the teacher's tokens); use loss.weights.uld"
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
