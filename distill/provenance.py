"""Where a trained student came from: recorded once per run, read by the model card.

The loop puts `run_provenance(...)` into its training state, so every checkpoint carries it
(`training_state.json`) and `distillery export CKPT OUT` can write a complete model card without the
campaign's config at hand: the resolved config and its hash, distillery's version and git commit, the
prepared data's fingerprint and sources, and the teacher (path, parameters, content hash, signal).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from distill.config import CampaignConfig


@cache
def distillery_version() -> dict[str, str | None]:
    """The installed version, and the git commit when running from a checkout (None otherwise)."""
    try:
        version = metadata.version("distillery")
    except metadata.PackageNotFoundError:
        version = None
    root = Path(__file__).resolve().parent.parent
    commit = None
    if (root / ".git").exists():
        try:
            found = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            )
            commit = found.stdout.strip() or None
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            if commit and dirty:
                commit += "+modified"
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"version": version, "commit": commit}


def config_sha256(config: CampaignConfig) -> str:
    """Hash of the resolved config (defaults filled in), as JSON with sorted keys."""
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def run_provenance(
    config: CampaignConfig, prepared_manifest: dict[str, Any], teacher: dict[str, Any] | None
) -> dict[str, Any]:
    """What the model card says about a run (`teacher`: path, mode, parameters, sha256, signal)."""
    return {
        "config": config.model_dump(mode="json"),
        "config_sha256": config_sha256(config),
        "distillery": distillery_version(),
        "data": {
            "fingerprint": prepared_manifest["fingerprint"],
            "seq_len": prepared_manifest["seq_len"],
            "tokenizer_sha256": prepared_manifest["tokenizer"]["sha256"],
            "sources": {name: d.get("sources", []) for name, d in prepared_manifest["domains"].items()},
        },
        "teacher": teacher,
    }
