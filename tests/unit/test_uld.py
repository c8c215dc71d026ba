"""Cross-tokenizer pieces in one process: byte-offset alignment, paired tokenization, ULD's truncation.

The loss values and gradients against the dense reference (positional and hand-made alignment maps,
live and cached teachers, hybrid, tp2 = tp1) are cases of tests/distributed/ranks/check_losses.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.data.pairing.alignment import (
    align_rows,
    byte_offset_pairs,
    positional_pairs,
    span_groups,
    split_offset_row,
)
from distill.data.pairing.pairs import Pairing, _Pairer
from distill.data.token_text import token_text
from distill.data.tokenizer import load_tokenizer, train_tokenizer
from distill.losses.uld import TeacherTop, uld
from parallel.vocab import VocabShard
from tests import loss_reference as ref
from tests.helpers import stdlib_texts

TEXTS = [
    "Hello  world,\tcafé naïve — 東京タワーは高い 🤖🚀 end.\n",
    "  leading spaces, ümlaut €uro ½ and a very_long_identifier_name(x)\n\n",
    "日本語のテキストと English mixed: Straße, Ελληνικά, עברית 👩‍👩‍👧 done",
]


# -- alignment on hand-made spans ---------------------------------------------------------------


def test_byte_offset_pairs_positions_that_read_the_same_text():
    # student: "Hel" "lo" " world" "!"   teacher: "Hello" " wor" "ld" "!"
    student = np.array([3, 5, 11, 12])
    teacher = np.array([5, 9, 11, 12])
    paired = byte_offset_pairs(student, teacher)
    # after "Hello" (student position 1, teacher 0) both predict the group " world" / " wor"+"ld";
    # after " world" (student 2, teacher 2) both predict "!"
    assert paired.tolist() == [-1, 0, 2]


def test_zero_width_tokens_and_a_late_teacher_start_do_not_shift_pairs():
    # teacher: a BOS of no bytes, then tokens; it starts at byte 2 (a cut character before it)
    student = np.array([2, 4, 6, 9])
    teacher = np.array([2, 2, 4, 9])
    paired = byte_offset_pairs(student, teacher)
    # boundary 2: student's next token is index 1 (pos 0), teacher's first token ending beyond 2 is index 2
    # boundary 4: student pos 1 / teacher pos 2 predict a group ("4-6"+"6-9" vs "4-9")
    assert paired.tolist() == [1, 2, -1]


def test_positional_pairs_truncate_to_the_shorter():
    assert positional_pairs(5, 4).tolist() == [0, 1, 2, -1, -1]
    assert positional_pairs(3, 10).tolist() == [0, 1, 2]


# -- pairing real tokenizations ---------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher-tok") / "tokenizer"
    train_tokenizer(stdlib_texts(20, start=5), out, algorithm="byte_level_bpe", vocab_size=900)
    return out


def packed_row(student_dir: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    info = load_tokenizer(student_dir)
    tok = Tokenizer.from_str(info.backend_json)
    ids: list[int] = []
    for text in TEXTS:
        ids += tok.encode(text, add_special_tokens=False).ids + [info.eos_id]
    return np.asarray(ids, dtype=np.int64)


@pytest.mark.parametrize("cut", [(0, None), (1, -1), (5, -3)])
def test_paired_tokenization_keeps_the_text_and_aligns_byte_boundaries(tokenizer_dir, teacher_tokenizer, cut):
    """Words, runs of whitespace, accents, CJK and emoji (several tokens per character on one side),
    documents separated by EOS; the sequence may start and end inside a character."""
    student, teacher = load_tokenizer(tokenizer_dir), load_tokenizer(teacher_tokenizer)
    row = packed_row(tokenizer_dir)[cut[0] : cut[1]]
    pairer = _Pairer(student, Pairing(teacher, 400))
    tokens, offsets, _ = pairer.pair(row[None])
    length, s_ends, t_ends = split_offset_row(offsets[0], len(row))
    student_bytes, teacher_bytes = token_text(student), token_text(teacher)
    # the teacher's tokens spell the same documents (whole characters of the cut edges)
    s_docs = [student_bytes.join(part) for part in np.split(row, np.flatnonzero(row == student.eos_id))]
    t_ids = tokens[0, :length]
    t_docs = [teacher_bytes.join(part) for part in np.split(t_ids, np.flatnonzero(t_ids == teacher.eos_id))]
    assert len(s_docs) == len(t_docs)
    for s_doc, t_doc in zip(s_docs, t_docs, strict=True):
        assert t_doc in s_doc and len(s_doc) - len(t_doc) <= 6  # only cut characters are missing
    # each pair reads the same bytes and predicts a token starting at the same byte
    paired = byte_offset_pairs(s_ends, t_ends)
    assert (paired >= 0).mean() > 0.5
    for i, j in enumerate(paired.tolist()):
        if j >= 0:
            assert s_ends[i] == t_ends[j]
            assert s_ends[i + 1] > s_ends[i] and t_ends[j + 1] > t_ends[j]
    # the EOS predictions pair up
    for e in np.flatnonzero(row == student.eos_id):
        if e > 0:
            assert t_ids[paired[e - 1] + 1] == teacher.eos_id


def test_align_rows_indexes_the_flat_teacher_positions(tokenizer_dir, teacher_tokenizer):
    student, teacher = load_tokenizer(tokenizer_dir), load_tokenizer(teacher_tokenizer)
    row = packed_row(tokenizer_dir)[:60]
    _, offsets, _ = _Pairer(student, Pairing(teacher, 80)).pair(np.stack([row, row]))
    index = align_rows(offsets, len(row), 81, "byte_offset").reshape(2, -1)
    assert (index[1][index[1] >= 0] - 80 == index[0][index[0] >= 0]).all()
    positional = align_rows(offsets, len(row), 81, "positional").reshape(2, -1)
    length = int(offsets[0, 0])
    assert positional[0, : length - 1].tolist() == list(range(length - 1))


def test_a_teacher_sequence_longer_than_teacher_seq_len_is_cut_and_counted(tokenizer_dir, teacher_tokenizer):
    student, teacher = load_tokenizer(tokenizer_dir), load_tokenizer(teacher_tokenizer)
    row = packed_row(tokenizer_dir)
    tokens, offsets, tally = _Pairer(student, Pairing(teacher, 20)).pair(row[None])
    assert offsets[0, 0] == 21 and tally["truncated_sequences"] == 1 and tally["truncated_tokens"] > 0
    _, s_ends, t_ends = split_offset_row(offsets[0], len(row))
    paired = byte_offset_pairs(s_ends, t_ends)
    assert paired.max() < 20 and (s_ends[:-1][paired >= 0] <= t_ends[-1]).all()


# -- the truncated sorted sum -----------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_truncated_uld_is_within_its_bound_of_the_exact_sum(m):
    gen = torch.Generator().manual_seed(7)
    n, v_s, v_t, k = 40, 64, 50, 12
    student = torch.randn(n, v_s, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 4, n)[:, None]
    teacher_logits = torch.randn(n, v_t, generator=gen, dtype=torch.float64) * 3
    lp = F.log_softmax(teacher_logits, -1)
    kept, ids = lp.topk(k, -1)
    tail = (1 - kept.exp().sum(-1)).clamp_min(0)
    index = torch.arange(n)
    exact = ref.uld(student, ref.completed_teacher_probs(ids, kept, tail, v_t), index, temperature=1.0)
    top = TeacherTop(ids, kept.exp(), tail, v_t, torch.ones(n, dtype=torch.bool))
    found = uld(F.log_softmax(student, -1), top, VocabShard(0, v_s, None), m)
    gap = exact - found.value
    assert (gap >= -1e-12).all() and (gap <= found.bound + 1e-12).all(), (gap, found.bound)
    if m >= max(v_s, v_t):
        assert found.bound.abs().max() < 1e-12 and gap.abs().max() < 1e-12
    else:
        assert found.bound.max() > 0  # the bound is not vacuous: some rows have mass beyond the top m


def test_pairing_interrupted_and_resumed_writes_the_same_bytes(
    tmp_path, prepared_small, tokenizer_dir, teacher_tokenizer, monkeypatch
):
    import shutil

    from distill.data.pairing import pairs as pairing

    source = Path(prepared_small["data"]["dir"]) / "code"
    student, teacher = load_tokenizer(tokenizer_dir), load_tokenizer(teacher_tokenizer)
    monkeypatch.setattr(pairing, "CHUNK", 8)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for target in (whole, broken):
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("teacher", ".teacher.partial"))
    expected = pairing.pair_domain(whole, "code", student, Pairing(teacher, 60), progress=False)

    calls = {"n": 0}
    real = pairing._Pairer.pair

    def dies_on_the_third_chunk(self, rows):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a kill between two committed chunks
        return real(self, rows)

    monkeypatch.setattr(pairing._Pairer, "pair", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        pairing.pair_domain(broken, "code", student, Pairing(teacher, 60), progress=False)
    assert not (broken / "teacher").exists() and (broken / ".teacher.partial" / "state.json").is_file()
    monkeypatch.setattr(pairing._Pairer, "pair", real)
    resumed = pairing.pair_domain(broken, "code", student, Pairing(teacher, 60), progress=False)
    assert resumed == expected
    for path in sorted((whole / "teacher").iterdir()):
        assert path.read_bytes() == (broken / "teacher" / path.name).read_bytes(), path.name


def test_paired_prepare_by_array_parts_equals_one_part(
    tmp_path, small_corpus, tokenizer_dir, teacher_tokenizer
):
    import shutil

    from distill.config import load_config
    from distill.data.prepare.parts import prepare_part
    from distill.data.prepare.run import prepare
    from tests.helpers import prepare_tree, tree_bytes, write_config

    tree = prepare_tree(tmp_path / "run", small_corpus, tokenizer_dir, seq_len=48, heldout_sequences=2)
    tree["teacher"] = {"path": str(tmp_path / "unused"), "tokenizer": str(teacher_tokenizer), "seq_len": 70}
    tree["cache"] = {"dir": str(tmp_path / "cache")}
    config = write_config(tmp_path / "paired.yaml", tree)
    out = tmp_path / "run" / "prepared"
    prepare(load_config(config), progress=False)
    reference = tree_bytes(out, directories=True)
    assert any(name.endswith("teacher/offsets_train.bin") for name in reference)
    shutil.rmtree(out)
    for index in (1, 0):
        prepare_part(load_config(config), index, 2, progress=False)
    prepare(load_config(config), progress=False)  # the pack step, then the pairing
    assert tree_bytes(out, directories=True) == reference


def test_spans_are_closed_groups_that_both_sides_predict():
    # text "ab|cd|ef|g" (bytes 1..7): student "ab" "cd" "efg"; teacher "a" "bcd" "ef" "g"
    student_ends, teacher_ends = [2, 4, 7], [1, 4, 6, 7]
    row = np.array([4, *student_ends, *teacher_ends, 0], dtype=np.uint32)  # T + 1 = 5 slots, 4 real
    student_span, teacher_span, count = span_groups(row[None], 3, 5)
    # common boundaries 4 and 7: one closed span (4, 7] = "efg": student token 2, teacher tokens 2 and 3;
    # "abcd" holds both first tokens (never predicted) and is dropped
    assert count == 1
    assert student_span.tolist() == [-1, 0]  # row 1 predicts "efg"
    assert teacher_span.tolist() == [-1, 0, 0, -1]  # rows 1, 2 predict "ef", "g"; row 3 is padding


def test_vocab_projection_maps_each_teacher_id_to_its_longest_student_prefix(tmp_path, teacher_tokenizer):
    """Against a brute-force search: identical bytes, else the longest student piece that starts the
    teacher piece, ordinary pieces before byte-fallback tokens, never <unk>; EOS to EOS; the counts add
    up; a one-character teacher token goes where the student's own tokenizer puts that character."""
    from tokenizers import Tokenizer

    from distill.teacher.aligned import vocab_projection

    student_dir = tmp_path / "unigram"
    train_tokenizer(stdlib_texts(6), student_dir, algorithm="unigram", vocab_size=500)
    student, teacher = load_tokenizer(student_dir), load_tokenizer(teacher_tokenizer)
    projection = vocab_projection(student_dir, teacher_tokenizer, teacher.vocab_size, torch.device("cpu"))
    s_pieces, t_pieces = token_text(student).pieces, token_text(teacher).pieces
    byte_ids = {3 + b for b in range(256)}  # the unigram's layout: eos, pad, unk, then the 256 bytes
    unk = 2
    mapped = projection.teacher_to_student.tolist()
    assert mapped[teacher.eos_id] == student.eos_id
    exact = prefix = 0
    for t_id, piece in enumerate(t_pieces):
        if t_id == teacher.eos_id:
            exact += 1
            continue
        ordinary = [
            len(p)
            for i, p in enumerate(s_pieces)
            if p and i not in byte_ids and i != unk and piece.startswith(p)
        ]
        fallback = [1 for i in byte_ids if piece.startswith(s_pieces[i])]
        if not (ordinary or fallback):
            assert mapped[t_id] == -1, piece
            continue
        length = max(ordinary or fallback)
        assert s_pieces[mapped[t_id]] == piece[:length] and mapped[t_id] != unk, piece
        assert (mapped[t_id] in byte_ids) == (not ordinary), piece
        exact, prefix = (exact + 1, prefix) if length == len(piece) else (exact, prefix + 1)
    assert (projection.exact, projection.prefix) == (exact, prefix)
    assert projection.exact + projection.prefix + projection.unmapped == teacher.vocab_size
    assert exact > 100 and prefix > 100  # both kinds occur between a BPE and a unigram
    encode = Tokenizer.from_str(student.backend_json)
    checked = 0
    for t_id, piece in enumerate(t_pieces):
        text = piece.decode("utf-8", "ignore")
        if len(piece) == 1 and text.isprintable() and text != " ":
            ids = encode.encode(text, add_special_tokens=False).ids
            if len(ids) == 1:
                assert mapped[t_id] == ids[0], (piece, ids)
                checked += 1
    assert checked > 20
