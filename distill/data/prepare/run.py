"""`prepare(config)`: the stage's entry point. It runs the one-pass prepare (`stream.py`), or, when
`data.dir/.parts/` holds units that `prepare --part I/N` tasks encoded, the pack step (`pack.py`); both
write the same bytes."""

from __future__ import annotations

from typing import Any

from distill.config.schema import CampaignConfig
from distill.data.prepare.pack import pack
from distill.data.prepare.stage import PARTS, open_stage
from distill.data.prepare.stream import prepare_streaming


def prepare(config: CampaignConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or skip) the prepare of `config.data`; returns the manifest."""
    stage = open_stage(config)
    if (stage.out / PARTS).is_dir():
        return pack(stage, overwrite=overwrite, progress=progress)
    return prepare_streaming(stage, overwrite=overwrite, progress=progress)
