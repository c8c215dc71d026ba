"""Rolling log-likelihood windows: how a document longer than the context is scored.

This is the protocol of lm-evaluation-harness's `loglikelihood_rolling` (perplexity tasks, whose
`bits_per_byte` we compare against): the first window is a prefix token (BOS, or EOS when the tokenizer
has none) followed by the document's first `L - 1` tokens and predicts the first `L` tokens; each later
window predicts the next `L` tokens (fewer at the end) from the `L` tokens before its last prediction,
so every token is predicted exactly once, with between 1 and `L` tokens of context. `L` is the
prepared data's `seq_len`, the context the student was trained at.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Model input `[n]` tokens; its last `predicted` positions are scored against `targets`."""

    inputs: list[int]
    targets: list[int]  # [predicted]: the tokens the last `predicted` positions must predict

    @property
    def predicted(self) -> int:
        return len(self.targets)


def rolling_windows(ids: list[int], prefix: int, max_len: int) -> Iterator[Window]:
    """The windows that score every token of `ids` once (see the module docstring)."""
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    if not ids:
        return
    first = min(max_len, len(ids))
    yield Window([prefix, *ids[: first - 1]], ids[:first])
    predicted = first
    while predicted < len(ids):
        count = min(len(ids) - predicted, max_len)
        end = predicted + count
        start = max(0, end - max_len - 1)
        yield Window(ids[start : end - 1], ids[end - count : end])
        predicted = end
