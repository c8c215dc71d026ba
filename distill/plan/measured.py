"""What a plan reads from disk rather than from the config: the rates a previous run or the GPU run
measured, the prepared data's size, a written cache's bytes per token. Each number comes with where it came
from, and an assumption says it is one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distill.cache.format import SampledLayout, TopKLayout
from distill.config import CampaignConfig

ASSUMED_MFU = 0.35  # when no run of this campaign or bench result measured one
ASSUMED_DISTINCT = 10.0  # distinct ids per position of a sampled cache, when none was measured


@dataclass(frozen=True)
class Rates:
    """How fast the devices go: MFU (with a GPU) and a measured TFLOP/s per device (without one)."""

    mfu: float
    mfu_source: str
    tflops: tuple[float, str] | None


def rates(config: CampaignConfig) -> Rates:
    mfu, source = measured_mfu(config)
    return Rates(mfu, source, measured_tflops(config))


def metric_values(config: CampaignConfig, key: str) -> list[float]:
    """Every non-zero value of `key` in this campaign's metrics file (empty when there is none)."""
    if config.logging is None or not Path(config.logging.metrics).is_file():
        return []
    lines = Path(config.logging.metrics).read_text().splitlines()
    return [v for line in lines if f'"{key}"' in line if (v := json.loads(line).get(key))]


def measured_mfu(config: CampaignConfig) -> tuple[float, str]:
    """The MFU of a previous run of this campaign (its metrics), else of `bench/results/scale.json`, else
    the assumption."""
    if values := metric_values(config, "mfu"):
        assert config.logging is not None
        return float(values[-1]), f"measured: {config.logging.metrics}"
    bench = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_h200" / "scale_megatron.json"
    if bench.is_file():
        found = json.loads(bench.read_text())
        mfu = ((found.get("variants") or {}).get("ce") or {}).get("mfu")
        if mfu:
            return float(
                mfu
            ), f"measured: bench/results/gpu_h200/scale_megatron.json (1.24B student, {found['device']})"
    return ASSUMED_MFU, f"assumed {ASSUMED_MFU:.0%} (no run of this campaign or bench result measured one)"


def measured_tflops(config: CampaignConfig) -> tuple[float, str] | None:
    """Achieved model TFLOP/s per device of a previous run of this campaign (its metrics), if any: what
    time is planned from when no GPU is named (a CPU run, or the same cluster again)."""
    values = sorted(metric_values(config, "tflops_per_device"))
    if not values:
        return None
    assert config.logging is not None
    median = values[len(values) // 2]
    return median, f"the median {median:.3g} TFLOP/s per device measured in {config.logging.metrics}"


def training_tokens(config: CampaignConfig) -> int:
    assert config.training is not None
    return config.training.steps * config.training.global_batch * config.data.seq_len


def prepared_sequences(config: CampaignConfig, training: int) -> tuple[int, str]:
    """Sequences of the prepared data (train and held-out): counted in its manifest when it is there, else
    the training tokens' worth (each seen once)."""
    manifest = config.data.dir / "manifest.json"
    if manifest.is_file():
        domains = json.loads(manifest.read_text()).get("domains", {})
        count = sum(d.get("train_sequences", 0) + d.get("heldout_sequences", 0) for d in domains.values())
        if count:
            return count, f"measured: {manifest}"
    return training // config.data.seq_len, "the training tokens, each seen once (no prepared data yet)"


def cache_bytes_per_token(config: CampaignConfig, vocab: int) -> tuple[float, str]:
    cache = config.cache
    assert cache is not None
    if cache.mode == "topk":
        layout = TopKLayout(vocab, cache.k)
        return float(
            layout.record_bytes
        ), f"top-k k = {cache.k}: {layout.record_bytes} B per position (fixed)"
    manifest = cache.dir / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if (found.get("spec") or {}).get("samples") == cache.samples:
            return float(found["bytes_per_token"]), f"measured: {manifest}"
    layout = SampledLayout(vocab, cache.samples)
    per = 3 + ASSUMED_DISTINCT * (layout.id_bytes + 1)
    return per, (
        f"sampled N = {cache.samples}: assumed {ASSUMED_DISTINCT:g} distinct ids per position, before zlib "
        "(an upper bound; an existing cache is measured)"
    )
