"""The teacher logit cache: format, extraction against dense references, layouts, resume, integrity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
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
from distill.teacher.source import ReadAhead
from tests.conftest import REPO, write_config
from tests.distributed import run_ranks

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


# --- the cache stage on real processes -------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_work(tmp_path_factory, small_corpus, tokenizer_dir, tiny_model_dir) -> Path:
    """A few documents per domain prepared at seq_len 32 (a few hundred sequences), teacher + cache sections."""
    from distill.config import load_config
    from distill.data.prepare.run import prepare
    from tests.conftest import prepare_tree

    work = tmp_path_factory.mktemp("cache")
    domains = {
        "code": {"sources": [{"files": str(small_corpus / "code" / "*.jsonl"), "max_documents": 2}]},
        "prose": {"sources": [{"files": str(small_corpus / "prose" / "*.txt"), "max_documents": 3}]},
    }
    tree = prepare_tree(
        work / "data",
        small_corpus,
        tokenizer_dir,
        seq_len=32,
        heldout_sequences=3,
        heldout_fraction=0.5,
        domains=domains,
    )
    prepare(load_config(write_config(work / "prepare.yaml", tree)), progress=False)
    tree.update(
        teacher={"path": str(tiny_model_dir), "micro_batch": 4},
        cache={"dir": str(work / "cache"), "mode": "topk", "k": 16, "sequences_per_shard": 8, "samples": 50},
    )
    write_config(work / "config.yaml", tree)
    return work


@pytest.mark.slow
def test_cache_is_the_same_at_every_teacher_layout(cache_work, tmp_path):
    results = run_ranks("check_cache.py", 2, tmp_path, str(cache_work), "1,1", "2,1", "1,2")[0]["results"]
    for name, found in results.items():
        assert found["max_target_diff"] <= 0.01, name  # one float16 step of log p(target)
        if name.startswith("topk"):
            assert (
                found["id_mismatch"] < 1e-3
                and found["max_logprob_diff"] <= 0.01
                and found["max_tail_diff"] <= 1e-3
            ), name
        else:
            assert found["identical_sequences"] == 1.0, name


def distillery(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def cache_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_killed_cache_resumes_byte_identical(cache_work, tmp_path, mode):
    config = str(cache_work / "config.yaml")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    first = distillery("cache", config, "--set", f"cache.dir={reference}", "--set", f"cache.mode={mode}")
    assert first.returncode == 0, first.stderr[-3000:]
    command = [
        sys.executable,
        "-m",
        "launcher",
        "cache",
        config,
        "--set",
        f"cache.dir={killed}",
        "--set",
        f"cache.mode={mode}",
    ]
    proc = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while len(list(killed.rglob("shard_*.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the cache finished before it could be killed"
        )
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    (killed / "code" / "train" / ".shard_00099.idx.x1y2.tmp").write_bytes(b"half")  # as if killed mid-write
    resumed = distillery(*command[3:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert cache_files(killed) == cache_files(reference)
    info = json.loads(distillery("cache", "inspect", str(killed), "--sequences", "4").stdout)
    assert info["mode"] == mode and info["bytes_per_token"] > 0
    assert set(info["teacher_heldout_perplexity"]) == {"code", "prose"}


@pytest.mark.slow
def test_a_stopped_cache_part_exits_75_and_the_parts_finish_the_1_part_cache(cache_work, tmp_path):
    """Part 1/2 stops at once (a wall-time budget of 0 s: exit 75, nothing written), is re-run, then
    part 0/2 finishes and writes the manifest; the cache equals a 1-part run's byte for byte."""
    from distill.stop import EXIT_STOPPED

    config = str(cache_work / "config.yaml")
    reference, parts = tmp_path / "reference", tmp_path / "parts"
    assert distillery("cache", config, "--set", f"cache.dir={reference}").returncode == 0
    part = ["cache", config, "--set", f"cache.dir={parts}", "--part"]
    stopped = distillery(*part, "1/2", env={**os.environ, "DISTILLERY_STOP_AFTER": "0"})
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert "stopped on request (wall-time budget)" in stopped.stderr
    assert not list(parts.rglob("shard_*.json"))
    second = distillery(*part, "1/2")
    assert second.returncode == 0 and "shard(s) of other parts to go" in second.stderr, second.stderr[-3000:]
    assert not (parts / "manifest.json").exists()
    assert distillery(*part, "0/2").returncode == 0
    assert cache_files(parts) == cache_files(reference)
    refused = distillery(*part, "0/2", "--overwrite")
    assert refused.returncode == 2 and "--overwrite cannot be combined with --part" in refused.stderr


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_moved_data_trains_and_damage_reached_mid_run_stops_before_an_optimizer_step(
    cache_work, tmp_path, tiny_model_dir
):
    """The prepared data and cache are moved elsewhere and train from there with the same losses. Then
    a flipped byte in the cache (on 2 launched ranks) and in a token store, first reached by the run
    resumed at step 2: each stops it at step 3 with the file named, exit 2, no traceback, no step 3."""
    config = str(cache_work / "config.yaml")
    cache = tmp_path / "cache"
    assert distillery("cache", config, "--set", f"cache.dir={cache}").returncode == 0
    reference = distillery(
        "train", config, *_sets(tmp_path / "ref", cache, cache_work / "data" / "prepared", 2, tiny_model_dir)
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    prepared, moved = tmp_path / "elsewhere" / "prepared", tmp_path / "elsewhere" / "cache"
    shutil.copytree(cache_work / "data" / "prepared", prepared)
    shutil.move(cache, moved)
    run = tmp_path / "run"
    first = distillery("train", config, *_sets(run, moved, prepared, 2, tiny_model_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    assert _losses(run) == _losses(tmp_path / "ref")

    for shard in moved.rglob("shard_*.bin"):
        _flip(shard)
    verify = distillery("cache", "verify", str(moved))
    assert verify.returncode == 2 and "prose/train/shard_00001.bin: checksum mismatch" in verify.stderr
    damaged = distillery(
        "launch", "--nproc", "2", "--", "train", config, *_sets(run, moved, prepared, 4, tiny_model_dir, tp=2)
    )
    assert damaged.returncode == 2, damaged.stderr[-3000:]
    assert "Traceback" not in damaged.stderr and damaged.stderr.count("distillery: error:") == 1, (
        damaged.stderr
    )
    assert "is damaged, refusing to use its rows" in " ".join(damaged.stderr.split())
    assert "shard_" in damaged.stderr
    assert max(_losses(run)) == 2  # no step 3 was taken
    for shard in moved.rglob("shard_*.bin"):
        _flip(shard)  # repaired

    _flip(prepared / "code" / "train.bin")
    stopped = distillery("train", config, *_sets(run, moved, prepared, 4, tiny_model_dir))
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    assert "code/train.bin: sequences" in " ".join(stopped.stderr.split())
    assert "do not match their checksum" in " ".join(stopped.stderr.split())
    assert max(_losses(run)) == 2


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _sets(run: Path, cache: Path, prepared: Path, steps: int, student: Path, tp: int = 1) -> list[str]:
    items = [
        f"student.init={student}",
        f"run.dir={run}",
        f"cache.dir={cache}",
        f"data.dir={prepared}",
        f"parallel.tp={tp}",
        f"training.steps={steps}",
        "training.global_batch=4",
        "training.micro_batch=2",
        "training.lr=1e-3",
        "training.log_interval=1",
        "loss.weights.forward_kl=1.0",
        "checkpoint.dir=${run.dir}/ckpt",
        "checkpoint.interval=2",
        "logging.metrics=${run.dir}/metrics.jsonl",
    ]
    return [a for item in items for a in ("--set", item)]


def test_cache_of_other_prepared_data_is_refused(
    cache_work, tmp_path, prepared_small, small_corpus, tokenizer_dir
):
    from distill.cache.format import VERSION
    from distill.config import load_config
    from distill.data.prepare.run import prepare
    from tests.conftest import prepare_tree

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


@pytest.mark.slow
def test_read_ahead_matches_direct_reads(cache_work, tmp_path):
    """The one read-ahead (`ReadAhead`, used by the cached teacher source): rows read in the background
    for the announced batch equal direct reads; a batch other than the announced one is read directly."""
    cache = tmp_path / "cache"
    assert distillery("cache", str(cache_work / "config.yaml"), "--set", f"cache.dir={cache}").returncode == 0
    data = PreparedData(cache_work / "data" / "prepared")
    signal = CacheReader(cache, prepared=data, tokenizer_sha256=data.tokenizer_sha256, vocab_size=640)
    batches = [[("code", "train", i), ("prose", "heldout", i % 3)] for i in range(5)]
    loads: list[list] = []
    ahead = ReadAhead(lambda keys: (loads.append(keys), signal.batch(keys))[1], "test-read")
    ahead.start(batches[0])
    for keys, following in zip(batches, [*batches[1:], [("code", "train", 9)]], strict=True):
        fetched = ahead.get(keys)
        ahead.start(following)
        direct = signal.batch(keys)
        assert fetched.keys() == direct.keys() and all(torch.equal(fetched[k], direct[k]) for k in direct)
        assert fetched["ids"].shape[:2] == (2, 32) and fetched["logprobs"].shape == (2, 32, 16)
    other = [("prose", "train", 1)]
    assert torch.equal(ahead.get(other)["ids"], signal.batch(other)["ids"])  # not the announced batch
    ahead.close()
    assert loads[:5] == batches and loads[-1] == other  # each batch read once, ahead of its use
