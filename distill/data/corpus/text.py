"""The text of one demo-corpus file: plain text as it is, HTML reduced to its text, man pages rendered.

Man pages are rendered by groff to plain UTF-8 text (80 columns, no overstriking); a `.so` page is a
redirect to another page and is skipped; renders shorter than `MIN_MAN_CHARS` are stubs and rejected.
Long documents are split at line ends into pieces of at most `max_doc_chars` (`split_text`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

MIN_MAN_CHARS = 200  # shorter renders are stubs ("see foo(1)") rather than documents
MAN_TIMEOUT_S = 30


def load_document(path: Path, kind: str, groff: str | None) -> tuple[str, str | None, str]:
    """(status, text, sha256 of the source file); status is "ok", "skip" (a .so redirect) or "reject".

    `kind`: "text" (as it is), "html" (its text content) or "man" (rendered by groff to plain text)."""
    try:
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if kind != "man":
            text = raw.decode("utf-8", errors="replace")
            return "ok", html_text(text) if kind == "html" else text, digest
        roff = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8", errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return "reject", None, ""
    if roff.startswith(".so "):
        return "skip", None, digest
    # -K utf8: the input is UTF-8 (translated pages); -t: tables; -P -cbou: plain text, no overstriking.
    cmd = [groff or "groff", "-T", "utf8", "-mandoc", "-t", "-K", "utf8", "-rLL=80n", "-P", "-cbou"]
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    try:
        done = subprocess.run(cmd, input=roff.encode(), capture_output=True, env=env, timeout=MAN_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return "reject", None, digest
    text = tidy(done.stdout.decode("utf-8", errors="replace"))
    return ("ok" if done.returncode == 0 and len(text.strip()) >= MIN_MAN_CHARS else "reject"), text, digest


class _TextExtractor(HTMLParser):
    _BLOCK = frozenset("p div br li ul ol dl dt dd pre tr table h1 h2 h3 h4 h5 h6 section title".split())

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.hidden = 0  # depth inside <script>/<style>

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.hidden += tag in ("script", "style")
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        self.hidden -= tag in ("script", "style") and self.hidden > 0
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def html_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return tidy("".join(parser.parts))


def tidy(text: str) -> str:
    """Trailing blanks and runs of empty lines are layout, not content."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def split_text(text: str, max_chars: int) -> list[str]:
    """Consecutive pieces of at most `max_chars`, cut at line ends (hard cuts only inside longer lines)."""
    pieces: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        while len(line) > max_chars:
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        current += line
    return [*pieces, current] if current else pieces
