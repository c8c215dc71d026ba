"""Tests for the demo corpus: fake Debian roots under tmp_path, plus one small build from this machine."""

from __future__ import annotations

import gzip
import json
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from distill.data.corpus import build as corpus
from distill.data.corpus import text as corpus_text
from distill.data.corpus.build import (
    DEMO_DOMAINS,
    DemoCorpusSpec,
    DemoRoots,
    build_demo_corpus,
    read_corpus_manifest,
)
from distill.errors import DataError, OutputExistsError, UserError

needs_groff = pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")

FOO_1 = (
    ".TH FOO 1 2024-01-01 foo\n.SH NAME\nfoo \\- does things\n.SH SYNOPSIS\n.B foo\n[\\fIOPTION\\fR]...\n"
    ".SH DESCRIPTION\n.B foo\ndoes things to files, carefully and repeatedly, for the benefit of tests.\n"
    ".PP\nIt reads every file named on the command line and writes a summary of what it found.\n"
    ".TP\n.B \\-v\nBe verbose and print one line per file that is processed.\n"
)
BAR_1_DE = (
    ".TH BAR 1 2024-01-01 bar\n.SH BEZEICHNUNG\nbar \\- macht Dinge\n.SH BESCHREIBUNG\n.B bar\n"
    "verarbeitet Dateien sorgfältig und gründlich, Zeile für Zeile, damit die Tests etwas prüfen können.\n"
    ".PP\nJede Datei auf der Befehlszeile wird gelesen; eine Übersicht wird ausgegeben.\n"
)
LONG_LINES = [f"value_{i} = {i} * {i}  # a line of the long module number {i}\n" for i in range(400)]


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


@pytest.fixture
def roots(tmp_path: Path) -> DemoRoots:
    src = tmp_path / "src"
    std, doc, lic, man = src / "stdlib", src / "doc", src / "licenses", src / "man"
    _write(std / "os_like.py", '"""An os-like module."""\n\ndef join(a, b):\n    return a + "/" + b\n')
    _write(std / "json_like" / "__init__.py", "def dumps(obj):\n    return repr(obj)\n")
    _write(std / "long_module.py", "".join(LONG_LINES))
    _write(std / "test" / "test_os_like.py", "EXCLUDED_TEST = 1\n")
    _write(std / "idlelib" / "idle_test" / "test_x.py", "EXCLUDED_IDLE = 1\n")
    _write(std / "site-packages" / "pkg" / "mod.py", "EXCLUDED_SITE = 1\n")
    _write(std / "__pycache__" / "cached.py", "EXCLUDED_CACHE = 1\n")
    same = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nLicense: GPL-2+\n"
    _write(doc / "pkg-a" / "copyright", same)
    _write(doc / "pkg-b" / "copyright", same)  # identical: must be deduplicated
    _write(doc / "pkg-c" / "copyright", "Files: *\nCopyright: 2024 C Authors\nLicense: MIT\n")
    _write(lic / "GPL-2", "GNU GENERAL PUBLIC LICENSE\nVersion 2, June 1991\n" * 5)
    _write(lic / "MIT", "Permission is hereby granted, free of charge, to any person.\n")
    _write(man / "man1" / "foo.1.gz", gzip.compress(FOO_1.encode(), mtime=0))
    _write(man / "man1" / "foo-alias.1.gz", gzip.compress(b".so man1/foo.1\n", mtime=0))
    (man / "man1" / "foo-link.1.gz").symlink_to("foo.1.gz")
    _write(man / "de" / "man1" / "bar.1.gz", gzip.compress(BAR_1_DE.encode(), mtime=0))
    return DemoRoots(stdlib=std, doc=doc, licenses=lic, man=man, python_doc=src / "no-python-doc")


def _build(out: Path, roots: DemoRoots, spec: DemoCorpusSpec | None = None, **kw) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_demo_corpus(out, spec or DemoCorpusSpec(), roots=roots, progress=False, **kw)


def _docs(out: Path, domain: str) -> list[dict]:
    return [json.loads(line) for p in sorted((out / domain).glob("part-*.jsonl")) for line in p.open()]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_byte_identical(tmp_path, roots):
    m1 = _build(tmp_path / "a", roots)
    m2 = _build(tmp_path / "b", roots)
    assert m1 == m2
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert read_corpus_manifest(tmp_path / "a") == m1
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"code", "legal", "manifest.json"}


def test_code_excludes_tests_site_packages_and_caches(tmp_path, roots):
    m = _build(tmp_path / "out", roots, DemoCorpusSpec(domains=("code",)))
    text = "".join(d["text"] for d in _docs(tmp_path / "out", "code"))
    assert "def join" in text and "def dumps" in text
    for marker in ("EXCLUDED_TEST", "EXCLUDED_IDLE", "EXCLUDED_SITE", "EXCLUDED_CACHE"):
        assert marker not in text
    assert sorted(t["path"] for t in m["taken"]["code"]) == [
        "json_like/__init__.py",
        "long_module.py",
        "os_like.py",
    ]
    assert all(len(t["sha256"]) == 64 for t in m["taken"]["code"])


def test_byte_cap_holds_and_gives_fewer_documents(tmp_path, roots):
    full = _build(tmp_path / "full", roots, DemoCorpusSpec(domains=("code",), max_doc_chars=500))
    small = _build(
        tmp_path / "small",
        roots,
        DemoCorpusSpec(domains=("code",), max_bytes_per_domain=3000, max_doc_chars=500),
    )
    docs = _docs(tmp_path / "small", "code")
    assert 0 < small["domains"]["code"]["bytes"] <= 3000
    assert sum(len(d["text"].encode()) for d in docs) == small["domains"]["code"]["bytes"]
    assert len(docs) == small["domains"]["code"]["documents"] < full["domains"]["code"]["documents"]


def test_long_texts_split_at_lines_and_rejoin(tmp_path, roots):
    _build(tmp_path / "out", roots, DemoCorpusSpec(domains=("code",), max_doc_chars=1000))
    pieces = [d["text"] for d in _docs(tmp_path / "out", "code") if d["source"].endswith("long_module.py")]
    assert len(pieces) > 1
    assert all(len(p) <= 1000 and p.endswith("\n") for p in pieces)
    assert "".join(pieces) == "".join(LONG_LINES)
    assert corpus_text.split_text("x" * 25 + "\nab\n", 10) == ["x" * 10, "x" * 10, "xxxxx\nab\n"]


def test_legal_deduplicates_copyright_files(tmp_path, roots):
    m = _build(tmp_path / "out", roots, DemoCorpusSpec(domains=("legal",)))
    stats = m["domains"]["legal"]
    assert stats["duplicates_skipped"] == 1
    assert stats["documents"] == 4 and stats["files_used"] == 4
    texts = [d["text"] for d in _docs(tmp_path / "out", "legal")]
    assert len(texts) == len(set(texts))
    assert [s["status"] for s in stats["sources"]] == ["used", "used"]


@needs_groff
def test_man_pages_rendered_english_and_german(tmp_path, roots):
    m = _build(tmp_path / "out", roots, DemoCorpusSpec(domains=("docs", "multilingual")))
    (doc,) = _docs(tmp_path / "out", "docs")  # the .so redirect and the symlink are skipped
    assert doc["source"].endswith("man1/foo.1.gz") and doc["lang"] == "en"
    assert "NAME" in doc["text"] and "foo - does things" in doc["text"]
    assert not any(line.startswith((".SH", ".TH", ".B", ".PP")) for line in doc["text"].splitlines())
    assert "\\f" not in doc["text"] and "\b" not in doc["text"]
    (de,) = _docs(tmp_path / "out", "multilingual")
    assert de["lang"] == "de" and de["domain"] == "multilingual"
    assert "BEZEICHNUNG" in de["text"] and "sorgfältig" in de["text"]
    assert m["taken"]["multilingual"][0]["path"] == "de/man1/bar.1.gz"
    python_doc = m["domains"]["docs"]["sources"][1]
    assert python_doc["status"] == "missing" and python_doc["reason"] == "directory does not exist"


def test_missing_groff_is_reported(tmp_path, roots, monkeypatch):
    monkeypatch.setattr(corpus, "_groff_path", lambda: None)
    m = _build(tmp_path / "out", roots)
    assert m["domains"]["docs"]["sources"][0]["reason"] == corpus.GROFF_MISSING
    assert {x["domain"] for x in m["missing"]} == {"docs", "multilingual"}
    assert not (tmp_path / "out" / "docs").exists()
    assert m["domains"]["code"]["documents"] > 0


def test_missing_root_is_reported_and_others_still_work(tmp_path, roots):
    roots = replace(roots, licenses=tmp_path / "nowhere")
    with pytest.warns(UserWarning, match="nowhere"):
        m = build_demo_corpus(
            tmp_path / "out", DemoCorpusSpec(domains=("legal",)), roots=roots, progress=False
        )
    lic = m["domains"]["legal"]["sources"][1]
    assert lic == {
        "root": str(tmp_path / "nowhere"),
        "pattern": "*",
        "status": "missing",
        "reason": "directory does not exist",
    }
    assert m["domains"]["legal"]["documents"] == 2 and m["missing"] == []


def test_all_domains_missing_raises(tmp_path):
    gone = tmp_path / "gone"
    roots = DemoRoots(stdlib=gone, doc=gone, licenses=gone, man=gone, python_doc=gone)
    with pytest.raises(DataError) as err:
        _build(tmp_path / "out", roots)
    for domain in DEMO_DOMAINS:
        assert domain in str(err.value)
    assert not (tmp_path / "out").exists()


def test_second_call_is_a_noop(tmp_path, roots):
    spec = DemoCorpusSpec(domains=("code", "legal"))
    m1 = _build(tmp_path / "out", roots, spec)
    before = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    time.sleep(0.01)
    assert _build(tmp_path / "out", roots, spec) == m1
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == before


def test_different_spec_needs_overwrite(tmp_path, roots):
    _build(tmp_path / "out", roots, DemoCorpusSpec(domains=("code",)))
    other = DemoCorpusSpec(domains=("code",), max_doc_chars=1000)
    with pytest.raises(OutputExistsError, match="max_doc_chars") as err:
        _build(tmp_path / "out", roots, other)
    assert "--overwrite" in str(err.value)
    m = _build(tmp_path / "out", roots, other, overwrite=True)
    assert m["spec"]["max_doc_chars"] == 1000 and read_corpus_manifest(tmp_path / "out") == m


def test_unknown_data_is_not_replaced_without_overwrite(tmp_path, roots):
    _write(tmp_path / "out" / "notes.txt", "mine")
    with pytest.raises(OutputExistsError, match="no manifest.json"):
        _build(tmp_path / "out", roots, DemoCorpusSpec(domains=("code",)))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert _build(tmp_path / "empty", roots, DemoCorpusSpec(domains=("code",)))["domains"]["code"][
        "documents"
    ]


def test_unknown_domain_raises(tmp_path, roots):
    with pytest.raises(UserError, match="multilingual"):
        _build(tmp_path / "out", roots, DemoCorpusSpec(domains=("code", "poetry")))


def test_system_roots_small_cap(tmp_path):
    m = _build(tmp_path / "out", DemoRoots.system(), DemoCorpusSpec(max_bytes_per_domain=20_000))
    for domain in ("code", "legal"):
        assert 0 < m["domains"][domain]["bytes"] <= 20_000
        assert _docs(tmp_path / "out", domain)
    if not Path("/usr/share/man").is_dir() or shutil.which("groff") is None:
        pytest.skip("no /usr/share/man or no groff: docs and multilingual are not checked")
    assert 0 < m["domains"]["docs"]["bytes"] <= 20_000
    if any(not p.parent.name.startswith("man") for p in Path("/usr/share/man").glob("*/man1")):
        langs = {d["lang"] for d in _docs(tmp_path / "out", "multilingual")}
        assert langs and "en" not in langs
