"""What identifies a prepare: its spec (compared by the stage contract) and the manifest with the fingerprint that the cache and training key on.

Neither holds a path: sources are named by their path below the glob's fixed directory, size and
SHA-256 (`ResolvedSource.describe`), and the fingerprint hashes only what defines the token stores (their
SHA-256s, the tokenizer, seq_len and the held-out rule). A prepared directory, its cache and its sources
can all move without orphaning anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from distill.atomic import read_json
from distill.config.schema import DataConfig
from distill.data.pairing.pairs import SUMMARY, TEACHER_DIR, Pairing
from distill.data.prepared import FORMAT, SPLITS, VERSION
from distill.data.sources.records import policy_of
from distill.data.sources.resolve import ResolvedSource
from distill.data.token_store import token_dtype
from distill.data.tokenizer import TokenizerInfo

SOURCE_HASHES = ".source-hashes.json"  # {path: [size, mtime_ns, sha256]}: re-runs hash only changed files


def known_hashes(out: Path) -> dict[str, list[Any]]:
    try:
        found = read_json(out / SOURCE_HASHES)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def prepare_spec(
    data: DataConfig,
    tokenizer: TokenizerInfo,
    sources: dict[str, list[ResolvedSource]],
    known: dict[str, list[Any]],
) -> dict[str, Any]:
    """Everything that determines the output bytes, and nothing about where inputs lie: two prepares
    with equal specs write equal stores."""
    policy = policy_of(data)
    return {
        "tokenizer_sha256": tokenizer.sha256,
        "seq_len": data.seq_len,
        "heldout_sequences": data.heldout_sequences,
        "heldout_fraction": data.heldout_fraction,
        "domains": {
            name: [
                {
                    **s.describe(known),
                    "max_documents": s.config.max_documents,
                    "sample_by": s.config.sample_by,
                }
                for s in srcs
            ]
            for name, srcs in sources.items()
        },
        "records": {k: getattr(policy, k) for k in ("on_bad_record", "invalid_utf8", "max_record_bytes")},
    }


def prepared_manifest(
    out: Path, spec: dict[str, Any], tokenizer: TokenizerInfo, pairing: Pairing | None = None
) -> dict[str, Any]:
    domains = {}
    for name in spec["domains"]:
        summary = read_json(out / name / "domain.json")
        summary["sources"] = spec["domains"][name]
        if pairing is not None:
            summary["teacher"] = read_json(out / name / TEACHER_DIR / SUMMARY)
        domains[name] = summary
    fingerprint_input = {  # what the token stores hold, never where anything lies
        "tokenizer_sha256": spec["tokenizer_sha256"],
        "seq_len": spec["seq_len"],
        "heldout": [spec["heldout_sequences"], spec["heldout_fraction"]],
        "domains": {n: {s: d[f"{s}_sha256"] for s in SPLITS} for n, d in domains.items()},
    }
    if pairing is not None:  # the teacher's tokens are part of what the data is
        fingerprint_input["pairing"] = {
            **pairing.spec(),
            "domains": {
                n: {
                    s: [d["teacher"]["splits"][s][f"{k}_sha256"] for k in ("teacher", "offsets")]
                    for s in SPLITS
                }
                for n, d in domains.items()
            },
        }
    fingerprint = hashlib.sha256(json.dumps(fingerprint_input, sort_keys=True).encode()).hexdigest()
    return {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec,
        "tokenizer": _describe(tokenizer),
        "seq_len": spec["seq_len"],
        "dtype": str(token_dtype(tokenizer.vocab_size)),
        "domains": domains,
        "fingerprint": fingerprint,
        **(
            {"teacher_tokenizer": _describe(pairing.teacher), "teacher_seq_len": pairing.seq_len}
            if pairing
            else {}
        ),
    }


def _describe(tokenizer: TokenizerInfo) -> dict[str, Any]:
    return {
        "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "path": str(tokenizer.path),
    }
