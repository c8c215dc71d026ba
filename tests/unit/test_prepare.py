"""`prepare` against an independent reference: HF AutoTokenizer + the documented packing rule."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from distill.config import load_config
from distill.data.prepare.run import prepare
from distill.data.prepared import PreparedData
from distill.errors import ConfigError, DataError, OutputExistsError
from tests.helpers import REPO, distillery, prepare_tree, tree_bytes, write_config


def run_prepare(tmp_path: Path, corpus: Path, tokenizer: Path, name: str = "run", overrides=(), **data):
    path = write_config(tmp_path / f"{name}.yaml", prepare_tree(tmp_path / name, corpus, tokenizer, **data))
    return prepare(load_config(path, overrides), progress=False), tmp_path / name / "prepared"


def documents(corpus: Path, domain: str) -> list[str]:
    if domain == "code":
        return [
            json.loads(line)["text"] for f in sorted((corpus / "code").glob("*.jsonl")) for line in f.open()
        ]
    return [f.read_text(encoding="utf-8") for f in sorted((corpus / "prose").glob("*.txt"))]


def reference_pack(texts, tokenizer_dir, seq_len, heldout_sequences, fraction):
    """Straight from the documented rule, with the HF tokenizer: EOS after each document, whole
    documents routed to held-out by blake2b(text) < fraction until it holds enough sequences."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    t = seq_len + 1
    train, heldout = [], []
    heldout_rows = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        ids = ids + [tok.eos_token_id]
        score = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2.0**64
        if heldout_rows < heldout_sequences and score < fraction:
            heldout += ids
            full = min(len(heldout) // t, heldout_sequences)
            if full >= heldout_sequences:
                heldout = heldout[: full * t]
            heldout_rows = full
        else:
            train += ids
    cut = lambda seq: np.array(seq[: len(seq) // t * t]).reshape(-1, t)  # noqa: E731
    return cut(train), cut(heldout)


def test_prepare_matches_reference_packing(tmp_path, small_corpus, tokenizer_dir):
    manifest, out = run_prepare(tmp_path, small_corpus, tokenizer_dir)
    data = PreparedData(out)
    assert data.domains == ("code", "prose") and data.seq_len == 64
    for domain in data.domains:
        train, heldout = reference_pack(documents(small_corpus, domain), tokenizer_dir, 64, 6, 0.2)
        assert len(heldout) == 6 and len(train) > 20
        assert data.num_sequences(domain, "train") == len(train)
        assert manifest["domains"][domain]["heldout_sequences"] == len(heldout)
        for i in (0, len(train) // 2, len(train) - 1):
            np.testing.assert_array_equal(data.sequence(domain, i), train[i])
        np.testing.assert_array_equal(data.store(domain, "train").batch(np.arange(len(train))), train)
        np.testing.assert_array_equal(data.store(domain, "heldout").batch(np.arange(6)), heldout)
    assert manifest["tokenizer"]["sha256"] == data.tokenizer_sha256
    assert (out / "config.yaml").is_file() and not (out / ".partial").exists()


def test_output_independent_of_workers_and_batching(tmp_path, small_corpus, tokenizer_dir):
    one, _ = run_prepare(tmp_path, small_corpus, tokenizer_dir, "a", workers=1, batch_chars=1)
    two, _ = run_prepare(tmp_path, small_corpus, tokenizer_dir, "b", workers=2, batch_chars=30000)
    assert one == two


def test_parquet_and_text_line_sources(tmp_path, small_corpus, tokenizer_dir):
    texts = documents(small_corpus, "code")
    pq.write_table(pa.table({"content": texts}), tmp_path / "code.parquet")
    (tmp_path / "lines.txt").write_text(
        "".join(f"line {i}: {t.splitlines()[0]}\n" for i, t in enumerate(texts))
    )
    domains = {
        "pq": {"sources": [{"files": str(tmp_path / "code.parquet"), "text_field": "content"}]},
        "lines": {
            "sources": [{"files": str(tmp_path / "lines.txt"), "sample_by": "line", "max_documents": 20}]
        },
    }
    manifest, _ = run_prepare(
        tmp_path, small_corpus, tokenizer_dir, seq_len=8, heldout_sequences=0, domains=domains
    )
    assert manifest["domains"]["pq"]["documents"] == len(texts)
    assert manifest["domains"]["lines"]["documents"] == 20  # max_documents caps a source
    jsonl, _ = run_prepare(tmp_path, small_corpus, tokenizer_dir, "j", seq_len=8, heldout_sequences=0)
    assert manifest["domains"]["pq"]["train_sha256"] == jsonl["domains"]["code"]["train_sha256"]


def test_rerun_is_a_noop_and_other_config_is_refused(tmp_path, small_corpus, tokenizer_dir):
    manifest, out = run_prepare(tmp_path, small_corpus, tokenizer_dir)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again, _ = run_prepare(tmp_path, small_corpus, tokenizer_dir)
    assert again == manifest and (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError, match=r"seq_len: 64 on disk, 32 in the config.*--overwrite"):
        run_prepare(tmp_path, small_corpus, tokenizer_dir, seq_len=32)
    assert PreparedData(out).seq_len == 64  # the refused run changed nothing


def test_overwrite_replaces(tmp_path, small_corpus, tokenizer_dir):
    _, out = run_prepare(tmp_path, small_corpus, tokenizer_dir)
    path = write_config(
        tmp_path / "c.yaml", prepare_tree(tmp_path / "run", small_corpus, tokenizer_dir, seq_len=32)
    )
    manifest = prepare(load_config(path), overwrite=True, progress=False)
    assert manifest["seq_len"] == 32 and PreparedData(out).seq_len == 32


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (
            {"domains": {"a": {"sources": [{"files": "/nonexistent/*.jsonl"}]}}},
            r"data\.domains\.a\.sources\[0\]\.files: no file matches",
        ),
        ({"seq_len": 10**7}, r"data\.domains\.code: .* do not fill one training sequence"),
        ({"heldout_fraction": 1e-9}, r"data\.domains\.code: no held-out sequence"),
        (
            {"domains": {"a": {"sources": [{"files": "EMPTY"}]}}},
            r"empty\.jsonl: empty file \(data\.domains\.a\.sources\[0\]\); fix it, or set data\.on_bad_record: skip",
        ),
        (
            {"domains": {"a": {"sources": [{"files": "BLANK"}]}}},
            r"data\.domains\.a: the sources yielded no non-empty document",
        ),
        ({"domains": {"a": {"sources": [{"files": "CODE", "text_field": "body"}]}}}, r"no field 'body'"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, small_corpus, tokenizer_dir, data, pattern):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n' * 3)
    for spec in data.get("domains", {}).values():
        for src in spec["sources"]:
            src["files"] = {
                "EMPTY": str(tmp_path / "empty.jsonl"),
                "BLANK": str(tmp_path / "blank.jsonl"),
                "CODE": str(small_corpus / "code" / "*.jsonl"),
            }.get(src["files"], src["files"])
    with pytest.raises(DataError, match=pattern):
        run_prepare(tmp_path, small_corpus, tokenizer_dir, **data)
    assert not (tmp_path / "run" / "prepared" / "manifest.json").exists()


def test_seq_len_below_two_and_broken_tokenizer(tmp_path, small_corpus, tokenizer_dir):
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        run_prepare(tmp_path, small_corpus, tokenizer_dir, seq_len=1)
    broken = tmp_path / "broken-tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken-tok does not load"):
        run_prepare(tmp_path, small_corpus, broken)


def test_foreign_output_directory_is_refused(tmp_path, small_corpus, tokenizer_dir):
    target = tmp_path / "run" / "prepared"
    target.mkdir(parents=True)
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="precious.txt"):
        run_prepare(tmp_path, small_corpus, tokenizer_dir)
    assert (target / "precious.txt").read_text() == "keep me"


def store_bytes(out: Path) -> dict[str, bytes]:
    return tree_bytes(out, skip=("config.yaml",))


def kill_after_progress(command: list[str], out: Path) -> None:
    """Start `command` (a prepare into `out`) and SIGKILL it once it has committed some progress."""
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE)
    state = out / ".partial" / "code" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["train_sequences"] > 0:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "prepare finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_prepare_resumes_byte_identical(tmp_path, small_corpus, tokenizer_dir):
    """SIGKILL a real `distillery prepare` mid-way (after it committed progress), then re-run it."""
    _, reference = run_prepare(tmp_path, small_corpus, tokenizer_dir, "reference")
    path = write_config(
        tmp_path / "c.yaml", prepare_tree(tmp_path / "run", small_corpus, tokenizer_dir, batch_chars=1)
    )
    out = tmp_path / "run" / "prepared"
    command = [sys.executable, "-m", "launcher", "prepare", str(path)]
    kill_after_progress(command, out)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="no complete prepared data"):
        PreparedData(out)
    resumed = distillery(*command[3:], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "prepare code: resuming after" in resumed.stderr  # it continued, it did not start over
    assert store_bytes(out) == store_bytes(reference)
    assert PreparedData(out).fingerprint == PreparedData(reference).fingerprint
