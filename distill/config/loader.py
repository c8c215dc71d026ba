"""Load a campaign config: YAML file + `--set a.b=c` overrides + `${...}` references -> validated tree.

Errors name the file, the full key path (`data.domains.code.sources[0].files`) and what was expected,
and say when the offending value came from a `--set` override rather than the file. OmegaConf does
the YAML merge and the references (`${run.dir}/corpus`, `${oc.env:SLURM_JOB_ID}`); pydantic does
the validation.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from distill.config.schema import CampaignConfig
from distill.errors import ConfigError


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> CampaignConfig:
    """Read, merge, resolve and validate the config at `path`."""
    path = Path(path)
    raw = _resolved_dict(path, overrides)
    try:
        return CampaignConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, overrides)) from None


def config_to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML (absolute paths, defaults filled in): what a run actually used."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _resolved_dict(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist" if not path.exists() else f"{path} is not a file"
        )
    try:
        base = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(base, dict) and not OmegaConf.is_dict(base):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got a list")
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.seq_len=512")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        resolved = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" at key {key}" if key else ""
        raise ConfigError(
            f"{path}{where}: {type(exc).__name__}: {exc.msg if hasattr(exc, 'msg') else exc}"
        ) from None
    assert isinstance(resolved, dict)
    return resolved


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(exc: ValidationError, path: Path, overrides: Sequence[str]) -> str:
    override_keys = {item.partition("=")[0].strip() for item in overrides}
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in _UNION_TAGS)
        key = _key_path(loc)
        if err["type"] == "extra_forbidden":
            message = "unknown key" + _suggestion(loc)
        elif err["type"] == "missing":
            message = "required key is missing"
        elif isinstance(err.get("input"), dict):  # a whole section's check: its message names the keys
            message = err["msg"].removeprefix("Value error, ")
        else:
            message = f"{err['msg'].removeprefix('Value error, ')} (got {_short(err.get('input'))})"
        origin = " (from --set)" if any(key == k or key.startswith(k + ".") for k in override_keys) else ""
        lines.append(f"  {key or 'config'}: {message}{origin}")
    return f"{path}: invalid config\n" + "\n".join(lines)


# pydantic inserts the chosen union member's type name into error locations; they are not keys.
_UNION_TAGS = {"list[str]", "str", "int", "float", "function-after[_absolute(), PathType]", "none"}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggestion(loc: tuple[int | str, ...]) -> str:
    """`did you mean 'seq_len'?` for a typo, from the field names of the section the key sits in."""
    model: Any = CampaignConfig
    for part in loc[:-1]:
        model = _child_type(model, part)
        if model is None:
            return ""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} valid keys here: {', '.join(names)}"


def _child_type(model: Any, part: int | str) -> Any:
    """The type found one step down `model` at key/index `part`, unwrapping Optional/list/dict."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        field = model.model_fields.get(str(part))
        return _unwrap(field.annotation) if field else None
    origin = typing.get_origin(model)
    if origin in (list, tuple) and isinstance(part, int):
        return _unwrap(typing.get_args(model)[0])
    if origin is dict:
        return _unwrap(typing.get_args(model)[1])
    return None


def _unwrap(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if (
        typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        and args
    ):
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation
