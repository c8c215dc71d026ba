"""Models and tokenizers named by Hugging Face Hub id: `hf://org/name`, or `hf://org/name@revision`.

Wherever the config takes a model or tokenizer directory (`teacher.path`, `teacher.tokenizer`,
`student.init`, `data.tokenizer.path`) it also takes a hub id in this explicit form, so that a mistyped
local path stays a path error instead of turning into a download. A hub id resolves through
`huggingface_hub` to a snapshot directory of its cache (`HF_HOME`, `HF_HUB_CACHE`), and that directory
is what every loader reads; its name is the commit, which the cache manifest and the model card record.

Resolution looks in the local cache first and downloads only what is missing: every stage of a campaign
(prepare, cache, train, eval, often on different nodes) resolves a branch name such as `main` to the same
cached commit, even if the branch moves on the hub meanwhile; pin `@<commit>` to say which one. With
`HF_HUB_OFFLINE=1` nothing is downloaded: a model that is not in the cache, or a revision of it that is
not, is one named error (`HubError`) that says what the cache holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config.hub_id import HUB_PREFIX, HubModel, ModelLocation, parse_location
from distill.errors import UserError

__all__ = ["HubError", "HubModel", "ModelLocation", "Snapshot", "hub_record", "local_dir", "parse_location"]

# what a model or tokenizer directory needs: no pickled (.bin, .pth) weights, GGUF or framework copies
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]
MODEL_FILES = [*TOKENIZER_FILES, "*.safetensors"]


class HubError(UserError):
    """A hub id that does not resolve: not in the local cache while offline, unknown, or unreachable."""


@dataclass(frozen=True)
class Snapshot:
    """A hub id resolved: the local snapshot directory and the commit it holds."""

    model: HubModel
    directory: Path

    @property
    def commit(self) -> str:
        return self.directory.name

    def record(self) -> dict[str, Any]:
        """What a manifest or model card keeps: the id as written and the exact commit."""
        return {"hub_id": self.model.repo_id, "revision": self.model.revision, "commit": self.commit}


def local_dir(location: ModelLocation, *, weights: bool = True, key: str | None = None) -> Path:
    """The directory to read for `location`: a local path as it is, a hub id's snapshot (with the model
    weights when `weights`, the tokenizer files only otherwise)."""
    if isinstance(location, HubModel):
        return resolve(location, weights=weights, key=key).directory
    return Path(location)


def hub_record(location: ModelLocation | str | None) -> dict[str, Any] | None:
    """The hub id and commit of `location` if it names one (from the local cache, where the stage that
    loaded it put it)."""
    if isinstance(location, str) and location.startswith(HUB_PREFIX):
        location = HubModel.parse(location)
    if not isinstance(location, HubModel):
        return None
    return resolve(location, weights=False).record()


def resolve(model: HubModel, *, weights: bool = True, key: str | None = None) -> Snapshot:
    """The local snapshot of `model`: the cached one if it is complete, else downloaded (unless offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f"{key} {model}" if key else str(model)
    patterns = MODEL_FILES if weights else TOKENIZER_FILES
    try:
        cached = Path(
            snapshot_download(
                model.repo_id, revision=model.revision, local_files_only=True, allow_patterns=patterns
            )
        )
        missing = _missing(cached, weights=weights)
        if not missing:
            return Snapshot(model, cached)
    except LocalEntryNotFoundError:
        cached, missing = None, []
    if constants.is_offline_mode():
        raise HubError(_offline_message(where, model, cached, missing, constants.HF_HUB_CACHE)) from None
    try:
        directory = Path(snapshot_download(model.repo_id, revision=model.revision, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise HubError(f"{where}: could not be downloaded from the Hugging Face Hub: {exc}") from None
    if missing := _missing(directory, weights=weights):
        raise HubError(f"{where}: commit {directory.name} has no {' or '.join(missing)}")
    return Snapshot(model, directory)


def _missing(directory: Path, *, weights: bool) -> list[str]:
    """What a loader will need from `directory` and does not find."""
    import json

    if not weights:
        return (
            []
            if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()
            else ["tokenizer.json"]
        )
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [name for name in shards if not (directory / name).is_file()]
    elif not (directory / "model.safetensors").is_file():
        missing.append("model.safetensors")
    return missing


def _offline_message(
    where: str, model: HubModel, cached: Path | None, missing: list[str], cache_dir: str
) -> str:
    offline = f"HF_HUB_OFFLINE=1, so nothing is downloaded (the cache: {cache_dir})"
    if cached is not None:
        return f"{where}: the cached snapshot {cached.name} lacks {', '.join(missing)}; {offline}"
    repo = Path(cache_dir) / f"models--{model.repo_id.replace('/', '--')}"
    if not repo.is_dir():
        return (
            f"{where}: not in the local Hugging Face cache; {offline}. Download it where there is network "
            f"(`hf download {model.repo_id}`) into the same HF_HOME"
        )
    refs = sorted(p.name for p in (repo / "refs").glob("*")) if (repo / "refs").is_dir() else []
    commits = (
        sorted(p.name[:12] for p in (repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
    )
    held = ", ".join([*(f"{r} (branch or tag)" for r in refs), *(f"{c}... (commit)" for c in commits)])
    return (
        f"{where}: revision {model.revision or 'main'!r} is not in the local Hugging Face cache, which holds "
        f"{held or 'no revision'} of {model.repo_id}; {offline}"
    )
