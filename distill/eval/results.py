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


def format_table(evaluation: dict[str, Any]) -> str:
    """Held-out bits per UTF-8 byte for the terminal: one row per domain (and all), one column per model."""
    names = list(evaluation["models"])
    width = max(10, *(len(n) + 2 for n in names))
    head = f"{'domain':<14}" + "".join(f"{n:>{width}}" for n in names)
    lines = [head, "-" * len(head)]
    for domain, scores in table_rows(evaluation, names):
        cells = [s["bits_per_byte"] if s else math.nan for s in scores]
        lines.append(f"{domain:<14}" + "".join(f"{value:>{width}.4f}" for value in cells))
    p = evaluation["protocol"]
    title = (
        f"held-out bits per UTF-8 byte (lower is better): the documents in the first {p['sequences']} "
        f"held-out sequences per domain, rolling windows of {p['max_len']} tokens"
    )
    return "\n".join([title, *lines])
