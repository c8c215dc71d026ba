"""Messy sources: every bad record named by file and line (`on_bad_record: error`), or skipped and
counted per source and reason (`skip`) with a cap; readers resume to exactly the next document."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.config.schema import SourceConfig
from distill.data.sources.records import RecordPolicy
from distill.data.sources.resolve import open_documents, resolve_source
from distill.errors import DataError
from tests.helpers import distillery, stdlib_texts, write_config
from tests.unit.test_prepare import kill_after_progress, run_prepare, store_bytes

GOOD = [t[:3000] for t in stdlib_texts(6, start=10)]
LIMIT = 4096
PREPARE_LIMIT = 1 << 17  # above the test corpus's longest document


def jsonl(*records: bytes) -> bytes:
    return b"".join(r + b"\n" for r in records)


def good_json(i: int) -> bytes:
    return json.dumps({"text": GOOD[i]}).encode()


# (file name, bytes, what the error names): one bad record each, after a good one (so the line is 2)
BAD_FILES = [
    (
        "utf8.txt",
        GOOD[0].encode().replace(b"\n", b" ") + b"\ncaf\xe9 au lait\n",
        "utf8.txt:2: invalid UTF-8 (byte 0xe9",
    ),
    ("notjson.jsonl", jsonl(good_json(0), b'{"text": "unterminated'), "notjson.jsonl:2: not JSON"),
    ("field.jsonl", jsonl(good_json(0), b'{"body": "x"}'), "field.jsonl:2: no field 'text'"),
    ("type.jsonl", jsonl(good_json(0), b'{"text": 17}'), "field 'text' holds int, expected a string"),
    ("array.jsonl", jsonl(good_json(0), b"[1, 2]"), "array.jsonl:2: a JSON list, expected an object"),
    ("nul.txt", b"fine line\nbinary\x00junk\n", "nul.txt:2: NUL byte in the text"),
    (
        "huge.txt",
        b"short\n" + b"x" * (3 * LIMIT) + b"\nafter\n",
        "huge.txt:2: line longer than data.max_record_bytes",
    ),
    ("empty.jsonl", b"", "empty.jsonl: empty file"),
    (
        "badgzip.jsonl.gz",
        gzip.compress(jsonl(good_json(0), good_json(1)))[:-20],
        "badgzip.jsonl.gz: cannot be read",
    ),
]


def source(path: Path, **extra) -> object:
    sample_by = "line" if path.suffix == ".txt" else "document"
    return resolve_source(
        SourceConfig(files=[str(path)], sample_by=sample_by, **extra), "data.domains.d.sources[0]"
    )


def read_all(src, policy: RecordPolicy) -> tuple[list[str], dict]:
    reader = open_documents(src, policy)
    return list(reader), reader.tally.state()


@pytest.mark.parametrize("name,content,named", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_error_mode_names_file_and_line(tmp_path, name, content, named):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as caught:
        read_all(source(tmp_path / name), RecordPolicy(max_record_bytes=LIMIT))
    message = str(caught.value)
    assert named in message and str(tmp_path) in message and "data.domains.d.sources[0]" in message


def test_skip_mode_counts_each_reason_and_keeps_the_good_records(tmp_path):
    for name, content, _ in BAD_FILES:
        if name.endswith(".jsonl"):
            (tmp_path / name).write_bytes(content)
    policy = RecordPolicy(on_bad_record="skip", max_record_bytes=LIMIT, max_bad_fraction=None)
    texts, tally = read_all(source(tmp_path / "*.jsonl"), policy)
    assert texts == [GOOD[0]] * 4  # array, field, notjson, type: each has one good record first
    assert tally["bad"] == {
        "a JSON list, expected an object (one per line)": 1,
        "empty file": 1,
        "field 'text' holds int, expected a string": 1,
        "no field 'text' (fields: ['body']); set text_field": 1,
        "not JSON: Invalid control character at (column 23)": 1,
    }
    assert tally["records"] == 9 and len(tally["examples"]) == 5


def test_invalid_utf8_replace_policy(tmp_path):
    (tmp_path / "u.txt").write_bytes(b"ok\ncaf\xe9\n")
    texts, tally = read_all(source(tmp_path / "u.txt"), RecordPolicy(invalid_utf8="replace"))
    assert texts == ["ok", "caf\ufffd"] and tally["replaced_utf8"] == 1 and tally["bad"] == {}


def test_caps_turn_too_many_bad_records_into_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(jsonl(good_json(0), b"x", b"y", good_json(1)))
    with pytest.raises(DataError, match="more than data.max_bad_records = 1 bad records"):
        read_all(source(tmp_path / "m.jsonl"), RecordPolicy(on_bad_record="skip", max_bad_records=1))
    with pytest.raises(
        DataError, match=r"2 of 4 records are bad \(50.00%\), more than data.max_bad_fraction = 0.4"
    ):
        read_all(source(tmp_path / "m.jsonl"), RecordPolicy(on_bad_record="skip", max_bad_fraction=0.4))


def _messy(tmp_path: Path, limit: int = LIMIT) -> dict[str, Path]:
    """One file of each kind, with bad records between good ones."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    json_lines = [good_json(0), b"not json", b"", good_json(1), b'{"body": 1}', good_json(2)]
    (tmp_path / "a.jsonl").write_bytes(jsonl(*json_lines))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(good_json(3), b"\xff\xfe", good_json(4))))
    lines = "\n".join(GOOD[1].splitlines()[:40]).encode()
    (tmp_path / "c.txt").write_bytes(
        lines + b"\nbad \xc3\x28 byte\r\nnul\x00\n" + b"y" * (limit + 9) + b"\nlast\n"
    )
    (tmp_path / "p.md").write_bytes(b"para one\nstill one\n\n\ncaf\xe9\n\npara three\r\n\r\npara four")
    (tmp_path / "d.txt").write_bytes(GOOD[5].encode())
    (tmp_path / "d2.txt").write_bytes(b"a document\x00with a NUL")
    table = pa.table({"text": [GOOD[0], None, "a\x00b", GOOD[1]]})
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=2)
    return {
        "json": tmp_path / "*.jsonl*",
        "line": tmp_path / "c.txt",
        "paragraph": tmp_path / "p.md",
        "document": tmp_path / "d*.txt",
        "parquet": tmp_path / "e.parquet",
    }


@pytest.mark.parametrize("kind", ["json", "line", "paragraph", "document", "parquet"])
def test_resuming_from_any_position_gives_the_same_documents_and_counts(tmp_path, kind):
    path = _messy(tmp_path)[kind]
    config = SourceConfig(files=[str(path)], sample_by=kind if kind in ("line", "paragraph") else "document")
    src = resolve_source(config, "data.domains.d.sources[0]")
    policy = RecordPolicy(on_bad_record="skip", max_record_bytes=LIMIT, max_bad_fraction=None)
    reader = open_documents(src, policy)
    states, texts = [json.loads(json.dumps(reader.state()))], []
    for text in reader:
        texts.append(text)
        states.append(json.loads(json.dumps(reader.state())))  # a JSON round trip, as state.json does
    final = reader.tally.state()
    assert final["bad"], "the messy file has bad records"
    for i, state in enumerate(states):
        resumed = open_documents(src, policy, state)
        assert list(resumed) == texts[i:], f"resumed after document {i}"
        assert resumed.tally.state() == final
    if kind == "paragraph":
        assert texts == ["para one\nstill one", "para three", "para four"]
        assert final["bad"] == {"invalid UTF-8 (byte 0xe9 at offset 3)": 1}


def test_relative_names_identify_moved_files(tmp_path):
    (tmp_path / "one" / "sub").mkdir(parents=True)
    (tmp_path / "one" / "sub" / "x.jsonl").write_bytes(jsonl(good_json(0)))
    first = resolve_source(SourceConfig(files=[str(tmp_path / "one" / "**" / "*.jsonl")]), "k").describe()
    os.rename(tmp_path / "one", tmp_path / "two")
    moved = resolve_source(SourceConfig(files=[str(tmp_path / "two" / "**" / "*.jsonl")]), "k")
    assert first == moved.describe()
    assert first["files"][0]["name"] == "sub/x.jsonl"


def _messy_prepare_tree(tmp_path: Path, corpus: Path, tokenizer: Path, **data) -> dict:
    from tests.helpers import prepare_tree

    messy = _messy(tmp_path / "messy", PREPARE_LIMIT)
    tree = prepare_tree(
        tmp_path / "run",
        corpus,
        tokenizer,
        on_bad_record="skip",
        max_record_bytes=PREPARE_LIMIT,
        max_bad_fraction=None,
        **data,
    )
    tree["data"]["domains"]["code"]["sources"].append({"files": str(messy["json"])})
    tree["data"]["domains"]["prose"]["sources"].append({"files": str(messy["line"]), "sample_by": "line"})
    return tree


def test_prepare_error_mode_exits_2_naming_the_line_and_leaves_nothing_that_looks_complete(
    tmp_path, small_corpus, tokenizer_dir
):
    tree = _messy_prepare_tree(tmp_path, small_corpus, tokenizer_dir)
    tree["data"]["on_bad_record"] = "error"
    path = write_config(tmp_path / "error.yaml", tree)
    result = distillery("prepare", path, timeout=None)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "messy/a.jsonl:2: not JSON" in " ".join(result.stderr.split())
    assert not (tmp_path / "run" / "prepared" / "manifest.json").exists()


@pytest.mark.slow
def test_skip_mode_prepare_counts_in_the_manifest_and_a_kill_resumes_byte_identical(
    tmp_path, small_corpus, tokenizer_dir
):
    tree = _messy_prepare_tree(tmp_path, small_corpus, tokenizer_dir)
    reference = write_config(
        tmp_path / "reference.yaml", {**tree, "data": {**tree["data"], "dir": str(tmp_path / "ref")}}
    )
    result = distillery("prepare", reference, timeout=None)
    assert result.returncode == 0, result.stderr
    assert "data.domains.code.sources[1]: skipped 3 of 8 records" in result.stderr
    manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    code = manifest["domains"]["code"]["bad_records"]["data.domains.code.sources[1]"]
    assert sum(code["bad"].values()) == 3 and code["bad"]["invalid UTF-8 (byte 0xff at offset 0)"] == 1
    prose = manifest["domains"]["prose"]["bad_records"]["data.domains.prose.sources[1]"]
    assert sum(prose["bad"].values()) == 3  # invalid UTF-8, NUL, a line over max_record_bytes

    tree["data"]["batch_chars"] = 1
    path = write_config(tmp_path / "killed.yaml", tree)
    out = tmp_path / "run" / "prepared"
    command = [sys.executable, "-m", "launcher", "prepare", str(path)]
    kill_after_progress(command, out)
    resumed = distillery(*command[3:], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    assert store_bytes(out) == store_bytes(tmp_path / "ref")
    assert json.loads((out / "manifest.json").read_text())["domains"] == manifest["domains"]


def test_moved_sources_are_recognised_as_complete(tmp_path, small_corpus, tokenizer_dir):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    first, out = run_prepare(tmp_path, corpus, tokenizer_dir, "run")
    corpus.rename(tmp_path / "elsewhere")
    again, _ = run_prepare(tmp_path, tmp_path / "elsewhere", tokenizer_dir, "run")
    assert again == first  # complete: nothing re-read, the same manifest
