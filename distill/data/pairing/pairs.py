"""Paired preparation for cross-tokenizer distillation (ULD): every student sequence in the teacher's tokens.

When the teacher's tokenizer is not the data's, `prepare` ends with this pass. For each packed student
sequence it takes back the sequence's exact bytes (`token_text.py`), splits them at the student's EOS
into document pieces, tokenizes each piece with the teacher's tokenizer and joins them with the
teacher's EOS, so both sides see the same text with the same document boundaries. It stores

- `<domain>/teacher/<split>`: the teacher sequence, `teacher_seq_len + 1` tokens, padded with the
  teacher's EOS after its real length;
- `<domain>/teacher/offsets_<split>` (uint32 rows): `[teacher length, student token ends (S + 1),
  teacher token ends (T + 1)]`, byte offsets into the sequence's text in which each EOS counts as one
  (virtual) byte, so both EOS mark the same boundary and align with each other.

Bounded teacher length: a teacher tokenization longer than `T + 1` tokens is cut there; the student
tokens past the teacher's last token get no teacher position (counted per domain as truncated tokens in
`teacher/pairing.json` and the manifest). Sequence edges: a sequence that starts inside a multi-byte
character gives the teacher the text from the next whole character, one that ends inside one gives it
the text up to the last whole character; those few bytes have no teacher token.

Byte spans of teacher tokens come from the teacher's token bytes when they reproduce the piece exactly
(byte-level BPE, SentencePiece with byte fallback), else from the tokenizer's character offsets.

Resumable like the rest of prepare: each chunk of sequences is appended and fsynced before `state.json`
records it, a restart truncates to the recorded count, and the finished directory appears by one rename,
so an interrupted pairing resumes to the same bytes.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distill.atomic import atomic_write_json, read_json
from distill.checkpoint import tokenizer_dir_of
from distill.config.schema import CampaignConfig
from distill.data.pairing.alignment import byte_offset_pairs
from distill.data.prepared import SPLITS
from distill.data.token_store import TokenStore, TokenStoreWriter, token_dtype
from distill.data.token_text import TokenText, token_text
from distill.data.tokenizer import TokenizerInfo, load_tokenizer
from distill.errors import DataError
from distill.messages import say

TEACHER_DIR = "teacher"
SUMMARY = "pairing.json"
WORK_DIR = ".teacher.partial"
CHUNK = 256  # sequences per committed chunk
VERSION = 1


@dataclass(frozen=True)
class Pairing:
    """The teacher side of a paired prepare: its tokenizer and its tokens per sequence."""

    teacher: TokenizerInfo
    seq_len: int  # teacher positions per sequence (stored sequences hold seq_len + 1 tokens)

    def spec(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "teacher_tokenizer_sha256": self.teacher.sha256,
            "teacher_seq_len": self.seq_len,
        }


@dataclass
class _State:
    split: int = 0  # index into SPLITS
    done: int = 0  # sequences of that split written
    teacher_tokens: int = 0
    truncated_sequences: int = 0
    truncated_tokens: int = 0  # student tokens after the teacher's last token
    aligned: int = 0  # student positions with a byte-offset partner
    positions: int = 0
    tallies: dict[str, dict[str, int]] | None = None  # finished splits


def _utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 bytes of each character `[len(text)]`."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000).astype(np.int64)


def _continuation(byte: int) -> bool:
    return 0x80 <= byte < 0xC0


class _Pairer:
    """Turns student sequences `[n, S + 1]` into teacher sequences and offset rows."""

    def __init__(self, student: TokenizerInfo, pairing: Pairing) -> None:
        from tokenizers import Tokenizer

        self.student_text = token_text(student)
        self.teacher_text: TokenText = token_text(pairing.teacher)
        self.teacher = Tokenizer.from_str(pairing.teacher.backend_json)
        self.student_eos, self.teacher_eos = student.eos_id, pairing.teacher.eos_id
        self.t_tokens = pairing.seq_len + 1
        self.lengths = self.student_text.lengths

    def _student_ends(self, row: np.ndarray) -> np.ndarray:
        widths = self.lengths[row].copy()
        widths[row == self.student_eos] = 1  # EOS: one virtual byte
        return np.cumsum(widths)

    def _pieces(self, row: np.ndarray, ends: np.ndarray) -> list[tuple[int, bytes | None]]:
        """The sequence in order as document pieces `(virtual start, bytes)` and `(virtual end, None)`
        for each EOS."""
        out: list[tuple[int, bytes | None]] = []
        start = 0
        eos = np.flatnonzero(row == self.student_eos).tolist()
        for cut in [*eos, len(row)]:
            if cut > start:
                begin = int(ends[start - 1]) if start else 0
                out.append((begin, self.student_text.join(row[start:cut])))
            if cut < len(row):
                out.append((int(ends[cut]), None))
            start = cut + 1
        return out

    def _teacher_piece(self, begin: int, raw: bytes, first: bool, last: bool) -> tuple[str, int]:
        """The whole characters of a piece (edges of the sequence may cut one) and where they start."""
        lead = 0
        if first:
            while lead < min(3, len(raw)) and _continuation(raw[lead]):
                lead += 1
        end = len(raw)
        if last:
            for cut in range(len(raw), max(lead, len(raw) - 4), -1):
                try:
                    raw[lead:cut].decode("utf-8")
                    end = cut
                    break
                except UnicodeDecodeError:
                    continue
        try:
            return raw[lead:end].decode("utf-8"), begin + lead
        except UnicodeDecodeError as exc:
            raise DataError(
                f"the student tokenizer's token bytes ({self.student_text.method}) do not give valid UTF-8 text "
                f"({exc}); pairing needs a tokenizer whose tokens map back to the text's bytes"
            ) from None

    def _spans(self, text: str, start: int, encoding: Any) -> np.ndarray:
        """Virtual byte end of each teacher token of `text` (which starts at virtual byte `start`)."""
        ids = np.asarray(encoding.ids, dtype=np.int64)
        widths = self.teacher_text.lengths[ids] if len(ids) else np.zeros(0, dtype=np.int64)
        raw = text.encode("utf-8")
        if int(widths.sum()) == len(raw) and self.teacher_text.join(ids) == raw:
            return start + np.cumsum(widths)
        char_bytes = np.concatenate([[0], np.cumsum(_utf8_lengths(text))])
        ends = char_bytes[np.asarray([e for _, e in encoding.offsets], dtype=np.int64)]
        return start + np.maximum.accumulate(ends) if len(ends) else ends

    def pair(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """Teacher tokens `[n, T + 1]`, offset rows `[n, 1 + S + 1 + T + 1]`, and tallies."""
        n, s_tokens = rows.shape
        tokens = np.full((n, self.t_tokens), self.teacher_eos, dtype=np.int64)
        offsets = np.zeros((n, 1 + s_tokens + self.t_tokens), dtype=np.int64)
        tally = {"teacher_tokens": 0, "truncated_sequences": 0, "truncated_tokens": 0, "aligned": 0}
        plans, texts = [], []
        for row in rows:
            ends = self._student_ends(row)
            pieces = self._pieces(row, ends)
            plan: list[tuple[int | None, int]] = []  # (text index, virtual start) or (None, EOS end)
            for i, (at, raw) in enumerate(pieces):
                if raw is None:
                    plan.append((None, at))
                    continue
                text, start = self._teacher_piece(at, raw, first=i == 0, last=i == len(pieces) - 1)
                plan.append((len(texts), start))
                texts.append(text)
            plans.append((ends, plan))
        encodings = self.teacher.encode_batch(texts, add_special_tokens=False) if texts else []
        for r, (ends, plan) in enumerate(plans):
            ids_parts, end_parts = [], []
            for index, start in plan:
                if index is None:  # an EOS: the teacher's EOS over the student's EOS byte
                    ids_parts.append(np.asarray([self.teacher_eos], dtype=np.int64))
                    end_parts.append(np.asarray([start], dtype=np.int64))
                    continue
                ids_parts.append(np.asarray(encodings[index].ids, dtype=np.int64))
                end_parts.append(self._spans(texts[index], start, encodings[index]))
            ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int64)
            t_ends = np.concatenate(end_parts).astype(np.int64) if end_parts else np.zeros(0, dtype=np.int64)
            length = min(len(ids), self.t_tokens)
            if len(ids) > self.t_tokens:
                tally["truncated_sequences"] += 1
                tally["truncated_tokens"] += int((ends > t_ends[length - 1]).sum())
            tokens[r, :length] = ids[:length]
            teacher_ends = np.full(self.t_tokens, t_ends[length - 1] if length else 0, dtype=np.int64)
            teacher_ends[:length] = t_ends[:length]
            offsets[r, 0] = length
            offsets[r, 1 : 1 + s_tokens] = ends
            offsets[r, 1 + s_tokens :] = teacher_ends
            tally["teacher_tokens"] += length
            tally["aligned"] += int((byte_offset_pairs(ends, teacher_ends[:length]) >= 0).sum())
        return tokens, offsets, tally


def pair_domain(
    domain_dir: Path, name: str, student: TokenizerInfo, pairing: Pairing, *, progress: bool
) -> dict[str, Any]:
    """Pair every sequence of one finished domain directory (resumable); returns its summary."""
    final = domain_dir / TEACHER_DIR
    if (final / SUMMARY).is_file():
        return read_json(final / SUMMARY)
    work = domain_dir / WORK_DIR
    work.mkdir(exist_ok=True)
    state_path = work / "state.json"
    state = _State(**read_json(state_path)) if state_path.is_file() else _State(tallies={})
    pairer = _Pairer(student, pairing)
    summary = read_json(domain_dir / "domain.json")

    while state.split < len(SPLITS):
        split = SPLITS[state.split]
        source = TokenStore(domain_dir / split, sums_sha256=summary.get(f"{split}_sums_sha256"))
        teacher = TokenStoreWriter(
            work / split,
            pairing.seq_len + 1,
            token_dtype(pairing.teacher.vocab_size),
            resume_sequences=state.done,
        )
        offsets = TokenStoreWriter(
            work / f"offsets_{split}",
            1 + source.seq_tokens + pairing.seq_len + 1,
            np.dtype("<u4"),
            resume_sequences=state.done,
        )
        bar = tqdm(
            total=len(source),
            initial=state.done,
            desc=f"pair {name}/{split}",
            unit="seq",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        while state.done < len(source):
            count = min(CHUNK, len(source) - state.done)
            rows = source.batch(np.arange(state.done, state.done + count))
            tokens, offset_rows, tally = pairer.pair(rows)
            teacher.append(tokens)
            offsets.append(offset_rows)
            teacher.flush()
            offsets.flush()
            state.done += count
            state.teacher_tokens += tally["teacher_tokens"]
            state.truncated_sequences += tally["truncated_sequences"]
            state.truncated_tokens += tally["truncated_tokens"]
            state.aligned += tally["aligned"]
            state.positions += count * (source.seq_tokens - 1)
            atomic_write_json(state_path, asdict(state))
            bar.update(count)
        bar.close()
        sums = {"teacher": teacher.close(), "offsets": offsets.close()}
        assert state.tallies is not None
        state.tallies[split] = {
            "sequences": state.done,
            "teacher_tokens": state.teacher_tokens,
            "truncated_sequences": state.truncated_sequences,
            "truncated_tokens": state.truncated_tokens,
            "byte_offset_aligned": state.aligned,
            "student_positions": state.positions,
            **{f"{kind}_{key}": value for kind, found in sums.items() for key, value in found.items()},
        }
        state = _State(split=state.split + 1, tallies=state.tallies)
        atomic_write_json(state_path, asdict(state))
    result = {"teacher_seq_len": pairing.seq_len, "splits": state.tallies}
    atomic_write_json(work / SUMMARY, result)
    state_path.unlink()
    if final.exists():  # a leftover of an interrupted rename cannot be complete (no summary): replace it
        shutil.rmtree(final)
    os.replace(work, final)
    train = result["splits"]["train"]
    share = train["byte_offset_aligned"] / max(1, train["student_positions"])
    say(
        f"prepare {name}",
        f"paired with the teacher's tokenizer: {train['teacher_tokens']:,} teacher tokens for "
        f"{train['student_positions']:,} student positions ({share:.1%} byte-aligned), "
        f"{train['truncated_sequences']:,} sequences cut at {pairing.seq_len + 1} teacher tokens",
    )
    return result


def resolve_pairing(config: CampaignConfig, student: TokenizerInfo) -> Pairing | None:
    """The teacher side to pair with, when the campaign has a teacher whose tokenizer is not the data's."""
    teacher = config.teacher
    if teacher is None:
        return None
    if teacher.tokenizer is not None:
        directory, key = teacher.tokenizer, "teacher.tokenizer"
    else:
        try:
            directory, key = tokenizer_dir_of(teacher.path), "teacher.path"
        except (DataError, OSError) as exc:
            raise DataError(
                f"teacher.path {teacher.path}: cannot read the teacher's tokenizer: {exc}"
            ) from None
    try:
        info = load_tokenizer(directory)
    except DataError as exc:
        raise DataError(f"{key}: the teacher's tokenizer does not load: {exc}") from None
    if info.sha256 == student.sha256:
        return None
    return Pairing(info, teacher.seq_len or 2 * config.data.seq_len)
