"""Shared fixtures: a small trained tokenizer, a small multi-format corpus, config files on disk."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import yaml

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REPO = Path(__file__).resolve().parents[1]
# `student.arch` of the tiny sized students the distributed training tests start from
TINY_STUDENT_ARCH = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "ffn_hidden_size": 64,
    "max_position_embeddings": 64,
}


def stdlib_texts(count: int, start: int = 0) -> list[str]:
    """Real, varied text: whole Python standard library modules, in a fixed order."""
    files = sorted(p for p in STDLIB.glob("*.py") if p.stat().st_size > 2000)
    return [f.read_text(encoding="utf-8") for f in files[start : start + count]]


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


def write_config(path: Path, tree: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def prepare_tree(run_dir: Path, corpus: Path, tokenizer: Path, **data: object) -> dict:
    """A minimal campaign config tree over `small_corpus`; `data` overrides keys of the data section."""
    section = {
        "tokenizer": {"path": str(tokenizer)},
        "seq_len": 64,
        "heldout_sequences": 6,
        "heldout_fraction": 0.2,
        "dir": str(run_dir / "prepared"),
        "workers": 2,
        "batch_chars": 20000,
        "checkpoint_seconds": 0,
        "domains": {
            "code": {"sources": [{"files": str(corpus / "code" / "*.jsonl")}]},
            "prose": {"sources": [{"files": str(corpus / "prose" / "*.txt")}]},
        },
    }
    section.update(data)
    return {"run": {"name": "test", "dir": str(run_dir)}, "data": section}


def tiny_llama(
    out: Path,
    tokenizer: Path,
    vocab_size: int,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    max_positions: int = 64,
) -> Path:
    """A tiny random HF Llama (2 layers, tied embeddings) over `tokenizer`, saved at `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.tokenizer_files import copy_tokenizer_files

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    copy_tokenizer_files(tokenizer, out)
    return out


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
