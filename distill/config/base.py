"""Shared pieces of the config tree: the strict section base class and path handling."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, PlainSerializer, PlainValidator

from distill.config.hub_id import HUB_PREFIX, HubModel


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


AbsPath = Annotated[Path, AfterValidator(_absolute)]


def _model_location(value: object) -> Path | HubModel:
    if isinstance(value, HubModel):
        return value
    if not isinstance(value, str | Path):
        raise ValueError(f"expected a directory or a hub id (hf://<org>/<name>), got {type(value).__name__}")
    if isinstance(value, str) and value.startswith(HUB_PREFIX):
        return HubModel.parse(value)
    return _absolute(Path(value))


# a model or tokenizer: a local directory (made absolute) or a hub id `hf://org/name[@revision]`
ModelPath = Annotated[
    Path | HubModel,
    PlainValidator(_model_location, json_schema_input_type=str),
    PlainSerializer(str, return_type=str),
]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
