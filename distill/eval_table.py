"""Reading `eval.json`: one table of scores (rows: domains then `all`; columns: models) for every view.

The terminal table, the report's markdown table and the model card's section all render these rows.
"""

from __future__ import annotations

import math
from typing import Any

Scores = dict[str, Any]  # one model's ce, ppl, bits_per_byte, ... on one domain


def table_rows(evaluation: dict[str, Any], names: list[str]) -> list[tuple[str, list[Scores | None]]]:
    """(domain, each named model's scores or None) for every domain in order, then the pooled `all`."""
    models = evaluation["models"]
    domains = list(dict.fromkeys(d for n in names for d in models[n]["domains"]))
    rows = [(d, [models[n]["domains"].get(d) for n in names]) for d in domains]
    return [*rows, ("all", [models[n]["all"] for n in names])]


def reencoded(model: dict[str, Any]) -> bool:
    """Whether a model of `eval.json` was scored with its own tokenizer (the held-out text re-encoded)
    rather than on the data's tokens; records from before tokenizers were recorded are the data's."""
    return not model.get("tokenizer", {}).get("same_as_data", True)


def format_table(evaluation: dict[str, Any]) -> str:
    """Held-out bits per UTF-8 byte for the terminal: one row per domain (and all), one column per model.
    A model scored with its own tokenizer is marked `*` and footnoted, with the documents its tokenizer
    did not reproduce exactly: its bits per byte compare, but over re-encoded text."""
    models = evaluation["models"]
    names = list(models)
    marked = [n for n in names if reencoded(models[n])]
    labels = [f"{n}*" if n in marked else n for n in names]
    width = max(10, *(len(n) + 2 for n in labels))
    head = f"{'domain':<14}" + "".join(f"{n:>{width}}" for n in labels)
    lines = [head, "-" * len(head)]
    for domain, scores in table_rows(evaluation, names):
        cells = [s["bits_per_byte"] if s else math.nan for s in scores]
        lines.append(f"{domain:<14}" + "".join(f"{value:>{width}.4f}" for value in cells))
    p = evaluation["protocol"]
    title = (
        f"held-out bits per UTF-8 byte (lower is better): the documents in the first {p['sequences']} "
        f"held-out sequences per domain, rolling windows of {p['max_len']} tokens"
    )
    for name in marked:
        tokenizer = models[name]["tokenizer"]
        inexact = models[name]["all"].get("inexact_documents", 0)
        exact = f"; {inexact} documents not reproduced exactly by it" if inexact else ""
        lines.append(
            f"* {name}: scored with its own tokenizer (sha256 {tokenizer['sha256'][:12]}, "
            f"vocab {tokenizer['vocab_size']}), the same text re-encoded{exact}"
        )
    return "\n".join([title, *lines])
