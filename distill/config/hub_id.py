"""The hub id a config key may hold instead of a directory: `hf://org/name`, or `hf://org/name@revision`.

Only the name lives here (the config tree validates it); `distill.hub` resolves it to a snapshot of the
local Hugging Face cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HUB_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class HubModel:
    """A model or tokenizer on the Hugging Face Hub, as the config names it."""

    repo_id: str
    revision: str | None = None  # branch, tag or commit; None: the repository's default branch

    @classmethod
    def parse(cls, text: str) -> HubModel:
        """`hf://org/name` or `hf://org/name@revision`; anything else is a ValueError saying so."""
        body = text.removeprefix(HUB_PREFIX)
        repo_id, _, revision = body.partition("@")
        if not _REPO_ID.match(repo_id) or ".." in repo_id or ("@" in body and not revision):
            raise ValueError(
                f"{text!r} is not a hub id: expected hf://<org>/<name> or hf://<org>/<name>@<revision>"
            )
        return cls(repo_id, revision or None)

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


ModelLocation = Path | HubModel  # what a model or tokenizer key of the config holds


def parse_location(text: str | Path) -> ModelLocation:
    """A command-line model argument: a hub id if it starts with `hf://`, else a path."""
    if isinstance(text, str) and text.startswith(HUB_PREFIX):
        return HubModel.parse(text)
    return Path(text)
