"""Shared pieces of the config tree: the strict section base class and path handling."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


AbsPath = Annotated[Path, AfterValidator(_absolute)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
