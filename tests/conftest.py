"""Shared fixtures: a small trained tokenizer, a small multi-format corpus, a tiny HF model, prepared data.

Every test under distributed/ (gloo ranks) and e2e/ (whole campaigns, a Slurm cluster) is marked `slow`:
`pytest -m "not slow"` runs the quick subset, the tests of unit/ that are not marked slow themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import few_documents, prepare_tree, stdlib_texts, tiny_llama, write_config

HERE = Path(__file__).resolve().parent
SLOW_DIRECTORIES = (HERE / "e2e", HERE / "distributed")  # in the order they run


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the distributed and end-to-end tests slow, and run them first: with two workers
    (`-n 2 --dist loadscope`, each module on one worker) the long modules then start at once instead of
    one of them starting when the other worker has nearly finished."""
    for item in items:
        if any(item.path.resolve().is_relative_to(directory) for directory in SLOW_DIRECTORIES):
            item.add_marker(pytest.mark.slow)
    order = {directory: rank for rank, directory in enumerate(SLOW_DIRECTORIES)}

    def rank(item: pytest.Item) -> int:
        path = item.path.resolve()
        return next((r for d, r in order.items() if path.is_relative_to(d)), len(order))

    items.sort(key=rank)  # stable: the collection order within each directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distill.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(stdlib_texts(30), out, algorithm="byte_level_bpe", vocab_size=600)
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two domains: `code` in two jsonl files, `prose` in text files (one document per file)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "code").mkdir()
    texts = stdlib_texts(24, start=40)
    for part in range(2):
        with open(root / "code" / f"part-{part}.jsonl", "w", encoding="utf-8") as f:
            for text in texts[part::2]:
                f.write(json.dumps({"text": text}) + "\n")
    (root / "prose").mkdir()
    for i, text in enumerate(stdlib_texts(12, start=80)):
        # docstrings and comments only: a different distribution from the code domain
        prose = "\n".join(line.strip("# ") for line in text.splitlines() if line.strip().startswith("#"))
        (root / "prose" / f"doc-{i:02d}.txt").write_text(
            prose + f"\nThe end of document {i}.\n", encoding="utf-8"
        )
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny random HF Llama (tied embeddings, vocab 640 >= the test tokenizer's 600) with that tokenizer."""
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "hf", tokenizer_dir, 640)


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path, tokenizer_dir: Path) -> dict:
    """`small_corpus` prepared at seq_len 32 (2 held-out sequences per domain); returns its config tree."""
    from distill.config import load_config
    from distill.data.prepare.run import prepare

    work = tmp_path_factory.mktemp("prepared")
    tree = prepare_tree(work / "data", small_corpus, tokenizer_dir, seq_len=32, heldout_sequences=2)
    prepare(load_config(write_config(work / "prepare.yaml", tree)), progress=False)
    return tree


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path, tokenizer_dir: Path) -> dict:
    """A few documents of `small_corpus` prepared at seq_len 32 (a few hundred sequences, 2 held-out per
    domain): for the tests that cache a teacher over every sequence at k = V, yet train a few steps."""
    from distill.config import load_config
    from distill.data.prepare.run import prepare

    work = tmp_path_factory.mktemp("prepared_tiny")
    domains = few_documents(small_corpus)
    tree = prepare_tree(
        work / "data",
        small_corpus,
        tokenizer_dir,
        seq_len=32,
        heldout_sequences=2,
        heldout_fraction=0.5,
        domains=domains,
    )
    prepare(load_config(write_config(work / "prepare.yaml", tree)), progress=False)
    return tree
