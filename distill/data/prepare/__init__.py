"""The `prepare` stage: `run.prepare` streams, tokenizes and packs every domain (`stream.py`), or packs the
units that `prepare --part I/N` tasks encoded (`parts.py`, `pack.py`). Both read documents through one
encode pipeline (`encode.py`, workers in `worker.py`) and pack with one `Packer` (`packing.py`)."""
