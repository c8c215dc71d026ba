"""The teacher logit cache in one process: the format, extraction against dense references (a gloo world of
one), a cache refused for other prepared data. The cache stage on real processes:
tests/distributed/test_cache_stage.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distill.cache import extract
from distill.cache.format import (
    SampledLayout,
    TopKLayout,
    decode_sampled,
    decode_topk,
    encode_sampled,
    encode_topk,
    pack_entries,
    unpack_entries,
)
from distill.cache.reader import CacheReader
from distill.data.prepared import PreparedData
from distill.errors import DataError
from tests.helpers import write_config

# --- format ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [8192, 128256, 151936, 262144])
def test_bit_packing_round_trips_any_vocabulary(vocab):
    rng = np.random.default_rng(0)
    layout = TopKLayout(vocab, 64)
    ids = rng.integers(0, vocab, size=(7, 64))
    values = rng.integers(0, layout.max_value + 1, size=(7, 64))
    low, high = unpack_entries(
        pack_entries(ids, values, layout.id_bits, layout.entry_bytes), layout.id_bits, layout.entry_bytes
    )
    assert np.array_equal(low, ids) and np.array_equal(high, values)


def test_storage_targets():
    assert TopKLayout(128256, 64).record_bytes == 198 <= 200  # k=64 at V=128k
    # N = 50 draws from a Zipf-like teacher over V = 128k that keeps about 12 distinct ids per position
    rng = np.random.default_rng(0)
    vocab, positions = 128256, 512
    p = 1.0 / np.arange(1, vocab + 1) ** 1.8
    p /= p.sum()
    scatter = rng.permutation(vocab)  # likely ids spread over the vocabulary, as in a real teacher
    draws = rng.choice(vocab, size=(positions, 50), p=p)
    shift = rng.integers(0, vocab, size=(positions, 1))  # each position its own likely ids
    draws = scatter[(draws + shift) % vocab]
    uniques = [np.unique(row, return_counts=True) for row in draws]
    distinct = np.array([len(u) for u, _ in uniques])
    blob = encode_sampled(
        np.concatenate([u for u, _ in uniques]),
        np.concatenate([c for _, c in uniques]),
        distinct,
        rng.normal(size=positions),
        SampledLayout(vocab, 50),
    )
    assert 8 <= distinct.mean() <= 16
    assert len(blob) / positions <= 48  # measured 31.6 (3-byte entries: 38)


def dense_logprobs(vocab: int, positions: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(positions, vocab)) * scale
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@pytest.mark.parametrize("vocab", [8192, 128256])
def test_topk_quantization_error_within_documented_bound(vocab):
    layout = TopKLayout(vocab, 64)
    lp = dense_logprobs(vocab, 6)
    ids = np.argsort(-lp, axis=-1)[:, :64]
    top = np.take_along_axis(lp, ids, -1)
    tail = 1 - np.exp(top).sum(-1)
    raw = np.frombuffer(encode_topk(ids, top, tail, lp[:, 0], layout), dtype=np.uint8).reshape(
        6, layout.record_bytes
    )
    decoded = decode_topk(raw, layout)
    assert np.array_equal(decoded["ids"], ids)
    bound = layout.max_abs_prob_error() + 2.0**-11 * tail.max() / (1 - tail.max())
    assert np.abs(np.exp(decoded["logprobs"]) - np.exp(top)).max() <= bound * np.exp(top[:, 0]).max()
    np.testing.assert_allclose(np.exp(decoded["logprobs"]).sum(-1) + decoded["tail"], 1.0, atol=1e-9)
    np.testing.assert_allclose(decoded["target_logprob"], lp[:, 0], rtol=2.0**-11)  # float16


@pytest.mark.parametrize("vocab", [151936, 262144])
def test_sampled_record_round_trips(vocab):
    layout = SampledLayout(vocab, 50)
    distinct = np.array([2, 1, 3])
    unique, counts = np.array([5, vocab - 1, 7, 0, 9, 100000]), np.array([49, 1, 50, 1, 1, 48])
    raw = np.frombuffer(
        encode_sampled(unique, counts, distinct, np.array([-0.5, -1.0, -2.0]), layout), dtype=np.uint8
    )
    decoded = decode_sampled(raw, 3, layout)
    assert np.array_equal(decoded["ids"], unique) and np.array_equal(decoded["counts"], counts)
    assert np.array_equal(decoded["distinct"], distinct)


# --- extraction against dense references (a gloo world of one) -----------------------------------


@pytest.fixture(scope="module")
def world_of_one():
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
        yield dist.group.WORLD
        dist.destroy_process_group()
    else:
        yield dist.group.WORLD


def test_topk_with_k_equal_v_reproduces_the_dense_distribution(world_of_one):
    vocab = 512
    logits = torch.randn(300, vocab) * 4
    ids, lps, tail, _ = extract.topk_with_tail(
        logits,
        vocab,
        temperature=1.5,
        target=torch.zeros(300, dtype=torch.long),
        vocab_start=0,
        group=world_of_one,
    )
    layout = TopKLayout(vocab, vocab)
    target = torch.zeros(300)
    raw = np.frombuffer(
        encode_topk(ids.numpy(), lps.numpy(), tail.numpy(), target.numpy(), layout), dtype=np.uint8
    )
    decoded = decode_topk(raw.reshape(300, layout.record_bytes), layout)
    p_hat = np.zeros((300, vocab))
    np.put_along_axis(p_hat, decoded["ids"], np.exp(decoded["logprobs"]), -1)
    p = torch.softmax(logits.double() / 1.5, -1).numpy()
    assert np.abs(decoded["tail"]).max() < 1e-6
    assert np.abs(p_hat - p).max() <= layout.max_abs_prob_error() * p.max()
    kl = (p * (np.log(p) - np.log(np.clip(p_hat, 1e-30, None)))).sum(-1)
    assert kl.max() < 1e-3


def test_sampled_target_is_unbiased(world_of_one):
    torch.manual_seed(0)
    logits = torch.randn(1, 64) * 2
    p = torch.softmax(logits.double(), -1)[0]
    draws = 200_000
    rows = draws // 50
    target = torch.zeros(rows, dtype=torch.long)
    ids, _ = extract.sample_ids(
        logits.expand(rows, -1), torch.rand(rows, 50), target=target, vocab_start=0, group=world_of_one
    )
    frequency = torch.bincount(ids.reshape(-1), minlength=64).double() / draws
    assert (frequency - p).abs().max() < 4 * (p * (1 - p) / draws).sqrt().max() + 1e-4


def test_target_logprob_matches_dense(world_of_one):
    logits = torch.randn(50, 300)
    target = torch.randint(0, 300, (50,))
    dense = torch.log_softmax(logits, -1)[torch.arange(50), target]
    *_, from_topk = extract.topk_with_tail(
        logits, 8, temperature=2.0, target=target, vocab_start=0, group=world_of_one
    )
    _, from_sampling = extract.sample_ids(
        logits, torch.rand(50, 4), target=target, vocab_start=0, group=world_of_one
    )
    for got in (from_topk, from_sampling):  # at temperature 1 whatever the top-k temperature
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=0)


def test_cache_of_other_prepared_data_is_refused(tmp_path, prepared_small, small_corpus, tokenizer_dir):
    from distill.cache.format import VERSION
    from distill.config import load_config
    from distill.data.prepare.run import prepare
    from tests.helpers import prepare_tree

    manifest = {
        "format": "distillery.cache",
        "version": VERSION,
        "shards": [],
        "spec": {
            "mode": "topk",
            "k": 4,
            "temperature": 1.0,
            "teacher_vocab_size": 640,
            "seq_len": 32,
            "prepared_fingerprint": PreparedData(Path(prepared_small["data"]["dir"])).fingerprint,
            "tokenizer_sha256": PreparedData(Path(prepared_small["data"]["dir"])).tokenizer_sha256,
        },
    }
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    other = prepare(
        load_config(
            write_config(
                tmp_path / "p.yaml", prepare_tree(tmp_path / "other", small_corpus, tokenizer_dir, seq_len=16)
            )
        ),
        progress=False,
    )
    data = PreparedData(tmp_path / "other" / "prepared")
    assert other["fingerprint"] == data.fingerprint
    with pytest.raises(DataError, match=r"written from prepared data with fingerprint .* but .* has"):
        CacheReader(tmp_path / "cache", prepared=data, tokenizer_sha256=data.tokenizer_sha256, vocab_size=640)
    with pytest.raises(DataError, match=r"teacher's vocabulary \(640\) exceeds the student's \(600\)"):
        same = PreparedData(Path(prepared_small["data"]["dir"]))
        CacheReader(tmp_path / "cache", prepared=same, tokenizer_sha256=same.tokenizer_sha256, vocab_size=600)
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({**manifest, "version": VERSION - 1}))
    with pytest.raises(DataError, match=rf"format v{VERSION - 1}; this distillery reads v{VERSION}: rebuild"):
        CacheReader(tmp_path / "cache", prepared=same, tokenizer_sha256=same.tokenizer_sha256, vocab_size=640)
    shutil.rmtree(tmp_path / "cache")
