"""The files that make a Hugging Face tokenizer directory, and copying them next to weights.

A checkpoint keeps its tokenizer (`tokenizer/`) and an HF export writes it beside the safetensors, so
both copy the same set of files; this module sits below both (`checkpoint.py`, `models/hf_io.py`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer files present in `source` into `target`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied
