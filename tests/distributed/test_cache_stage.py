"""The teacher cache stage on real processes: the same cache at every teacher layout (gloo ranks), a
killed or stopped cache resumed byte for byte, moved data trains and damage stops a run, the read-ahead.
The format and extraction in one process: tests/unit/test_cache.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.cache.reader import CacheReader
from distill.data.prepared import PreparedData
from distill.teacher.source import ReadAhead
from tests.distributed import run_ranks
from tests.helpers import REPO, distillery, tree_bytes, write_config


@pytest.fixture(scope="module")
def cache_work(tmp_path_factory, small_corpus, tokenizer_dir, tiny_model_dir) -> Path:
    """A few documents per domain prepared at seq_len 32 (a few hundred sequences), teacher + cache sections."""
    from distill.config import load_config
    from distill.data.prepare.run import prepare
    from tests.helpers import few_documents, prepare_tree, tiny_qwen3

    work = tmp_path_factory.mktemp("cache")
    domains = few_documents(small_corpus)
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
    tiny_qwen3(work / "qwen3", tokenizer_dir, 640, seed=3)  # a Qwen3 teacher: check_cache.py's third signal
    return work


@pytest.mark.slow
def test_cache_is_the_same_at_every_teacher_layout(cache_work, tmp_path):
    results = run_ranks("check_cache.py", 2, tmp_path, str(cache_work), "1,1", "2,1", "1,2")[0]["results"]
    assert {name.split("_")[0] for name in results} == {"topk", "sampled", "qwen3"}
    assert len(results) == 9
    for name, found in results.items():
        assert found["max_target_diff"] <= 0.01, name  # one float16 step of log p(target)
        if name.startswith(("topk", "qwen3")):
            assert (
                found["id_mismatch"] < 1e-3
                and found["max_logprob_diff"] <= 0.01
                and found["max_tail_diff"] <= 1e-3
            ), name
        else:
            assert found["identical_sequences"] == 1.0, name


def cache_files(root: Path) -> dict[str, bytes]:
    return tree_bytes(root)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_killed_cache_resumes_byte_identical_to_a_run_at_another_thread_count(cache_work, tmp_path, mode):
    config = str(cache_work / "config.yaml")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # the reference at one thread, the killed and resumed runs at the machine's count: the same bytes
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = distillery(
        "cache", config, "--set", f"cache.dir={reference}", "--set", f"cache.mode={mode}", env=one_thread
    )
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
