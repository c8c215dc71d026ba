"""Prepare throughput vs plain `tokenizers` batch encoding of the same text, side by side in one run.

    .venv/bin/python bench/prepare.py [--config configs/demo.yaml] [--repeats 3]

The baseline is the best case for tokenizing alone: every document already in memory, one
`Tokenizer.encode_batch_fast` call over all of them with the Rust thread pool on every core.
`prepare` does the whole job: hash the sources, read the jsonl (distillery's record reader), tokenize in
worker processes, pack, write and fsync the stores, hash them, write the manifest. Ratio = prepare tokens/s / baseline
tokens/s (target >= 0.5). Uses the demo teacher campaign's corpus (3.5M tokens, so start-up costs do not
dominate) and tokenizer, built first if missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, ensure_data_stages, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo_teacher.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "prepare.json"))
    args = parser.parse_args()

    from distill.data.prepare.run import prepare
    from distill.data.sources.resolve import iter_documents, resolve_source
    from distill.data.tokenizer import load_tokenizer

    config = ensure_data_stages(args.config, ("corpus", "tokenizer"))
    texts: list[str] = []
    for name, domain in config.data.domains.items():
        for i, source in enumerate(domain.sources):
            resolved = resolve_source(source, f"data.domains.{name}.sources[{i}]")
            texts.extend(iter_documents(resolved))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(load_tokenizer(config.data.tokenizer.path).backend_json)
    os.environ.pop("TOKENIZERS_PARALLELISM", None)

    baseline, ours, tokens = [], [], 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        baseline.append(time.perf_counter() - started)
        tokens = sum(len(e.ids) + 1 for e in encodings)  # + EOS, as prepare counts
        del encodings
        with tempfile.TemporaryDirectory() as tmp:
            run = config.model_copy(
                update={"data": config.data.model_copy(update={"dir": Path(tmp) / "prepared"})}
            )
            started = time.perf_counter()
            manifest = prepare(run, progress=False)
            ours.append(time.perf_counter() - started)
            assert sum(d["document_tokens"] for d in manifest["domains"].values()) == tokens
    result = {
        "documents": len(texts),
        "tokens": tokens,
        "cores": os.cpu_count(),
        "workers": config.data.workers,
        "baseline_tokens_per_s": tokens / statistics.median(baseline),
        "prepare_tokens_per_s": tokens / statistics.median(ours),
    }
    result["ratio"] = result["prepare_tokens_per_s"] / result["baseline_tokens_per_s"]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
