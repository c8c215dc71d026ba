"""Cross-tokenizer distillation end to end through the CLI: paired prepare, a top-k cache over the teacher
sequences, ULD (+ the vocabulary projection and the span term) training against the cache and against
the live teacher, and the bad inputs.

The teacher is a tiny random Gemma-3-style model (scaled embeddings, sandwich norms, sliding-window
layers: megatron-core has no mapping for it, so it runs as a Hugging Face module, cached and live) with
its own byte-level BPE (900 ids, trained on other text than the student's 600-id one). With a cache that keeps the teacher's whole distribution (k = its vocabulary) and
`top_m` above both vocabularies, the cached and the live teacher define the same ULD loss: the first
step's ULD matches within the cache's quantization error.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distill.config import load_config
from distill.data.prepare.run import prepare
from distill.data.prepared import PreparedData
from distill.data.token_text import token_text
from distill.data.tokenizer import load_tokenizer, train_tokenizer
from distill.errors import DataError
from distill.losses.uld import VocabMatch
from distill.teacher.aligned import Alignment, usable_match, vocab_match
from parallel.vocab import VocabShard
from tests.helpers import (
    TINY_STUDENT_ARCH,
    distillery,
    few_documents,
    prepare_tree,
    stdlib_texts,
    tiny_hf_only,
    training_section,
    write_config,
)

pytestmark = pytest.mark.slow
TEACHER_VOCAB = 960
CACHE_TOLERANCE = 2e-3  # quantized cached log-probs (see tests/distributed/test_distill.py)
SPAN_TOLERANCE = 5e-3  # float16 target log-probs (~5e-4 relative each), summed over a span's teacher tokens


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uld-teacher")
    train_tokenizer(stdlib_texts(20, start=5), root / "tokenizer", algorithm="byte_level_bpe", vocab_size=900)
    tiny_hf_only(root / "hf", root / "tokenizer", "gemma3", TEACHER_VOCAB, seed=1)
    return root / "hf"


def campaign(run: Path, corpus: Path, tokenizer: Path, teacher: Path, **teacher_keys: object) -> dict:
    domains = few_documents(corpus)
    tree = prepare_tree(
        run, corpus, tokenizer, seq_len=32, heldout_sequences=2, heldout_fraction=0.5, domains=domains
    )
    tree.update(
        student={
            "arch": TINY_STUDENT_ARCH,
            "init_dir": str(run / "student_init"),
        },
        training=training_section(),
        checkpoint={"dir": "${run.dir}/checkpoints", "interval": 100},
        logging={"metrics": "${run.dir}/metrics.jsonl"},
        teacher={"path": str(teacher), "micro_batch": 4, "seq_len": 48, **teacher_keys},
        cache={"dir": str(run / "cache"), "mode": "topk", "k": TEACHER_VOCAB, "sequences_per_shard": 64},
        loss={"weights": {"ce": 1.0, "uld": 1.5, "projected_kl": 1.0, "span": 1.0}, "uld": {"top_m": 1024}},
    )
    return tree


def step_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.fixture(scope="module")
def work(tmp_path_factory, small_corpus, tokenizer_dir, teacher_dir) -> Path:
    work = tmp_path_factory.mktemp("uld")
    tree = campaign(work / "run", small_corpus, tokenizer_dir, teacher_dir)
    write_config(work / "cached.yaml", tree)
    online = copy.deepcopy(tree)
    online["teacher"]["mode"] = "online"
    online["run"]["dir"] = str(work / "online")
    online["data"]["dir"] = str(work / "run" / "prepared")
    del online["cache"]
    write_config(work / "online.yaml", online)
    for args in (
        ("prepare", "cached.yaml"),
        ("cache", "cached.yaml"),
        ("train", "cached.yaml"),
        ("train", "online.yaml"),
    ):
        done = distillery(args[0], str(work / args[1]))
        assert done.returncode == 0, (args, done.stderr[-4000:])
    return work


def test_prepare_pairs_every_sequence_and_records_both_tokenizers(work, tokenizer_dir, teacher_dir):
    data = PreparedData(work / "run" / "prepared")
    assert data.paired and data.manifest["teacher_tokenizer"]["vocab_size"] == 900
    assert data.manifest["tokenizer"]["path"] == str(tokenizer_dir)
    teacher = PreparedData(work / "run" / "prepared", side="teacher")
    for domain in data.domains:
        for split in ("train", "heldout"):
            assert teacher.num_sequences(domain, split) == data.num_sequences(domain, split)
        assert teacher.sequence(domain, 0).shape == (49,)
        tally = data.manifest["domains"][domain]["teacher"]["splits"]["train"]
        assert 0.5 < tally["byte_offset_aligned"] / tally["student_positions"] <= 1


def test_cached_and_online_uld_projection_and_span_train_and_agree(work):
    cached, online = step_records(work / "run"), step_records(work / "online")
    assert [r["step"] for r in cached] == [1, 2, 3] == [r["step"] for r in online]
    for records in (cached, online):
        assert all(r["loss/uld"] > 0 and 0.5 < r["loss/uld_pairs"] <= 1 for r in records)
        assert all(r["loss/uld_bound"] < 1e-6 for r in records)  # top_m covers both vocabularies
    # the same student, batches and teacher distribution: the first step's terms agree
    assert abs(cached[0]["loss/uld"] - online[0]["loss/uld"]) < CACHE_TOLERANCE
    assert abs(cached[0]["loss/ce"] - online[0]["loss/ce"]) < 1e-5
    # the projection onto the student's vocabulary: the same map, the same (whole) teacher distribution
    assert all(r["loss/projected_kl"] > 0 and 0 <= r["loss/projected_unmapped"] < 1 for r in cached + online)
    assert abs(cached[0]["loss/projected_kl"] - online[0]["loss/projected_kl"]) < CACHE_TOLERANCE
    # span likelihoods: the cache's float16 target log-probs summed over each span vs the live teacher's
    assert all(r["loss/span"] > 0 for r in cached + online)
    assert abs(cached[0]["loss/span"] - online[0]["loss/span"]) < SPAN_TOLERANCE
    assert cached[-1]["loss"] < cached[0]["loss"]


def test_the_projection_knows_each_aligned_rows_own_next_tokens_on_both_sides(
    work, tokenizer_dir, teacher_dir
):
    """The in-context id of the projection: at every aligned row the teacher's own next token and the
    student's label start at the same byte, so their first bytes are equal (EOS pairs with EOS)."""
    config = load_config(work / "cached.yaml")
    data = PreparedData(work / "run" / "prepared")
    engine = SimpleNamespace(
        device=torch.device("cpu"), shard=VocabShard(0, 600, None), tokenizer_dir=tokenizer_dir
    )
    align = Alignment(config, data, engine, TEACHER_VOCAB, teacher_dir)  # type: ignore[arg-type]
    keys = [(domain, "train", i) for domain in data.domains for i in range(2)]
    index, _ = align.rows(keys)  # [b * S] flat teacher positions
    teacher_next = align.teacher_next(keys)  # [b * T]
    labels = np.stack([data.sequence(d, i, s)[1:] for d, s, i in keys]).reshape(-1)
    student, teacher = load_tokenizer(tokenizer_dir), load_tokenizer(teacher_dir)
    s_text, t_text = token_text(student).pieces, token_text(teacher).pieces
    checked = 0
    for row in np.flatnonzero(index >= 0):
        label, own = int(labels[row]), int(teacher_next[index[row]])
        assert (label == student.eos_id) == (own == teacher.eos_id), row
        if label != student.eos_id:
            assert s_text[label][:1] == t_text[own][:1], (row, s_text[label], t_text[own])
            checked += 1
    assert checked > 50


def test_the_gemma3_teacher_is_evaluated_on_its_own_tokens(work, teacher_dir):
    """Held-out teacher CE of an HF-module teacher with its own tokenizer: `distillery eval` re-encodes the
    held-out text with it; a random model of 960 entries is near the uniform ln(960) nats per token."""
    import math

    from distill.atomic import read_json

    done = distillery(
        "eval",
        "--data",
        work / "run" / "prepared",
        "--teacher",
        teacher_dir,
        "--out",
        work / "eval",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    teacher = read_json(work / "eval" / "eval.json")["models"]["teacher"]
    for domain, found in teacher["domains"].items():
        assert found["tokens"] > 0 and abs(found["ce"] - math.log(TEACHER_VOCAB)) < 0.5, (domain, found)


def test_uld_with_a_same_tokenizer_teacher_says_plain_kd_applies(work, prepared_small, tiny_model_dir):
    tree = copy.deepcopy(prepared_small)
    uld = campaign(work / "same", Path("/unused"), Path("/unused"), tiny_model_dir)
    tree.update({k: v for k, v in uld.items() if k not in ("run", "data", "cache")})
    tree["teacher"]["mode"] = "online"
    done = distillery("train", str(write_config(work / "same.yaml", tree)))
    assert done.returncode != 0
    said = " ".join(done.stderr.split())  # messages are wrapped
    assert "plain KD applies" in said and "loss.weights.uld" in said


def test_a_cache_built_over_another_pairing_is_refused(work, small_corpus, tokenizer_dir, teacher_dir):
    tree = campaign(work / "other", small_corpus, tokenizer_dir, teacher_dir, seq_len=40)
    tree["cache"]["dir"] = str(work / "run" / "cache")  # built over teacher sequences of 48 tokens
    path = write_config(work / "other.yaml", tree)
    assert distillery("prepare", str(path)).returncode == 0
    done = distillery("train", str(path))
    assert done.returncode != 0
    said = " ".join(done.stderr.split())  # messages are wrapped
    assert "built over another pairing" in said and "teacher_seq_len 40" in said


def test_a_teacher_tokenizer_that_does_not_load_names_the_key(
    tmp_path, small_corpus, tokenizer_dir, teacher_dir
):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    tree = campaign(tmp_path / "run", small_corpus, tokenizer_dir, teacher_dir)
    tree["teacher"]["tokenizer"] = str(tmp_path / "broken")
    with pytest.raises(DataError, match=r"teacher.tokenizer: the teacher's tokenizer does not load"):
        prepare(load_config(write_config(tmp_path / "c.yaml", tree)), progress=False)


def test_hybrid_matches_identical_token_bytes_and_warns_when_none_match(tokenizer_dir, teacher_dir, capsys):
    match = vocab_match(
        tokenizer_dir, teacher_dir, VocabShard(0, 640, None), TEACHER_VOCAB, torch.device("cpu")
    )
    assert 256 < match.count < 600  # the 256 byte tokens and common merges at least
    twins = match.teacher_to_student[match.teacher_to_student >= 0]
    assert len(set(twins.tolist())) == match.count and bool(match.student_mask[twins].all())
    assert usable_match(match) is match
    lonely = VocabMatch(torch.zeros(640, dtype=torch.bool), torch.full((TEACHER_VOCAB,), -1), 1)
    assert usable_match(lonely) is None
    assert "1 token(s) have identical text in both vocabularies" in capsys.readouterr().err
