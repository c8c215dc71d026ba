"""Cross-tokenizer data: the teacher's tokens of every prepared student sequence (`pairs.py`) and the
alignment of student to teacher positions by byte offsets (`alignment.py`)."""
