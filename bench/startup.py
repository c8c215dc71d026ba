"""Start-up cost of opening the teacher cache: all shards checksummed before step one (distillery <= 0.2)
vs each shard checksummed when a rank first reads it (now), on the demo cache and a synthetic large one.

"Before" is `CacheReader.verify()` over every shard (what `open_cache` ran, split over the ranks of a
job; here one process), "after" is opening the reader plus the first batch of rows (which verifies the
one shard they live in). The synthetic cache is random bytes in top-k layout with a valid manifest; it
is written once under --dir and reused. Each measurement runs warm (files in the page cache, the best
case for "before") and, where this process may drop the page cache (root), cold: read from the disk,
as after a requeue on another node. Also measured: the first read of a token-store block (8 MiB, its
SHA-256 checked before use).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from common import REPO, ensure_data_stages, write_result

SEQ_LEN = 2048
SHARD_SEQUENCES = 64  # 64 x 2048 x 198 B = 26 MB shards, as a k = 64 top-k cache at V = 128k


def synthetic_cache(directory: Path, gigabytes: float) -> dict:
    """A top-k cache manifest over `gigabytes` of random shards (written once, then reused)."""
    from distill.cache.format import FORMAT, MANIFEST, VERSION, TopKLayout

    layout = TopKLayout(vocab_size=128_000, k=64)
    manifest_path = directory / MANIFEST
    shard_bytes = SHARD_SEQUENCES * SEQ_LEN * layout.record_bytes
    shards = max(1, int(gigabytes * 1e9 // shard_bytes))
    if manifest_path.is_file() and len(json.loads(manifest_path.read_text())["shards"]) == shards:
        return json.loads(manifest_path.read_text())
    (directory / "web" / "train").mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).integers(0, 256, shard_bytes, dtype=np.uint8).tobytes()
    offsets = (np.arange(SHARD_SEQUENCES + 1, dtype="<u8") * SEQ_LEN * layout.record_bytes).tobytes()
    entries = []
    for i in range(shards):
        name = f"web/train/shard_{i:05d}"
        data = i.to_bytes(8, "little") + block[8:]  # distinct shards
        (directory / f"{name}.bin").write_bytes(data)
        (directory / f"{name}.idx").write_bytes(offsets)
        entries.append(
            {
                "file": f"{name}.bin",
                "domain": "web",
                "split": "train",
                "start": i * SHARD_SEQUENCES,
                "end": (i + 1) * SHARD_SEQUENCES,
                "bytes": shard_bytes,
                "sha256": hashlib.sha256(data).hexdigest(),
                "idx_sha256": hashlib.sha256(offsets).hexdigest(),
            }
        )
        print(f"synthetic cache: {i + 1}/{shards} shards", end="\r", flush=True)
    spec = {"mode": "topk", "k": 64, "temperature": 1.0, "teacher_vocab_size": 128_000, "seq_len": SEQ_LEN}
    spec.update(prepared_fingerprint="synthetic", tokenizer_sha256="synthetic")
    manifest = {"format": FORMAT, "version": VERSION, "spec": spec, "shards": entries}
    manifest_path.write_text(json.dumps(manifest))
    return manifest


def drop_page_cache() -> bool:
    """Empty the page cache (root only); False where that is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def measure(directory: Path, prepared: object, tokenizer_sha: str, vocab: int, first_key: tuple) -> dict:
    result = _measure(directory, prepared, tokenizer_sha, vocab, first_key)
    if drop_page_cache():
        cold = _measure(directory, prepared, tokenizer_sha, vocab, first_key, cold=True)
        result.update({f"cold_{k}": v for k, v in cold.items() if k.startswith(("startup", "ratio"))})
    return result


def _measure(
    directory: Path, prepared: object, tokenizer_sha: str, vocab: int, first_key: tuple, cold: bool = False
) -> dict:
    from distill.cache.reader import CacheReader

    started = time.perf_counter()
    reader = CacheReader(directory, prepared=prepared, tokenizer_sha256=tokenizer_sha, vocab_size=vocab)
    errors = reader.verify()
    before = time.perf_counter() - started
    assert not errors, errors
    if cold:
        drop_page_cache()
    started = time.perf_counter()
    reader = CacheReader(directory, prepared=prepared, tokenizer_sha256=tokenizer_sha, vocab_size=vocab)
    with np.errstate(all="ignore"):  # the synthetic rows are random bytes
        reader.batch([first_key])
    after = time.perf_counter() - started
    total = sum(s["bytes"] for s in reader.manifest["shards"])
    return {
        "cache_bytes": total,
        "shards": len(reader.manifest["shards"]),
        "startup_s_verify_all_before_step_one": round(before, 3),
        "startup_s_verify_on_first_read": round(after, 4),
        "ratio_before_over_after": round(before / after, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--gigabytes", type=float, default=10.0)
    parser.add_argument("--dir", default="/tmp/distillery-bench-startup")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "startup.json"))
    args = parser.parse_args()

    from distill.data.prepared import PreparedData

    config = ensure_data_stages(args.config, ("corpus", "tokenizer", "prepare", "cache"))
    data = PreparedData(config.data.dir)
    domain = data.domains[0]
    vocab = json.loads((Path(config.cache.dir) / "manifest.json").read_text())["spec"]["teacher_vocab_size"]
    demo = measure(Path(config.cache.dir), data, data.tokenizer_sha256, vocab, (domain, "train", 0))

    synthetic_dir = Path(args.dir)
    synthetic_cache(synthetic_dir, args.gigabytes)
    fake = SimpleNamespace(fingerprint="synthetic", directory=synthetic_dir)
    big = measure(synthetic_dir, fake, "synthetic", 128_000, ("web", "train", 5))

    store = data.store(domain)
    started = time.perf_counter()
    store[0]  # the first read of a block checks its SHA-256
    first_block = time.perf_counter() - started
    write_result(
        args.out,
        {
            "demo_cache": demo,
            "synthetic_cache": big,
            "token_store_first_block_read_s": round(first_block, 4),
            "token_store_bytes": store.bin_path.stat().st_size,
        },
    )


if __name__ == "__main__":
    main()
