"""The report's PNG plots (matplotlib, headless): one figure per question a person asks of a run.

Every figure has a title, axis labels with units, a legend outside the data when there are many lines,
and `constrained_layout` so no text overlaps. Domain colours are fixed per domain across figures.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI
import matplotlib.pyplot as plt

from distill.report.metrics_file import Metrics

DPI = 120


def _colours(domains: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {d: cycle[i % len(cycle)] for i, d in enumerate(domains)}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _legend(ax: plt.Axes, lines: int) -> None:
    if lines > 5:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    else:
        ax.legend(loc="best", fontsize="small")


def plot_losses(run: Metrics, baseline: Metrics | None, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    lines = 0
    for key in ["loss", *run.keys_like("loss/")]:
        steps, values = run.steps(key)
        if steps:
            label = "total (weighted)" if key == "loss" else key.split("/", 1)[1]
            ax.plot(steps, values, label=label, linewidth=2 if key == "loss" else 1.2)
            lines += 1
    if baseline is not None:
        steps, values = baseline.steps("loss/ce")
        if steps:
            ax.plot(steps, values, "k--", label="CE-only baseline: ce", linewidth=1.2)
            lines += 1
    ax.set(title="Training loss terms", xlabel="optimizer step", ylabel="loss (nats per token)")
    ax.grid(alpha=0.3)
    _legend(ax, lines)
    return _save(fig, out / "loss.png")


def plot_bits_per_byte(run: Metrics, baseline: Metrics | None, out: Path) -> Path | None:
    keys = run.keys_like("eval/", "/bpb")
    if not keys:
        return None
    domains = [k.split("/")[1] for k in keys]
    colour = _colours(domains)
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    for domain in domains:
        steps, values = run.steps(f"eval/{domain}/bpb")
        ax.plot(steps, values, "o-", color=colour[domain], label=f"{domain}: student")
        teacher = run.last(f"teacher/{domain}/bpb")
        if isinstance(teacher, float):
            ax.axhline(teacher, color=colour[domain], linestyle="--", linewidth=1, label=f"{domain}: teacher")
        if baseline is not None:
            b_steps, b_values = baseline.steps(f"eval/{domain}/bpb")
            if b_steps:
                ax.plot(b_steps, b_values, "x:", color=colour[domain], label=f"{domain}: CE-only baseline")
    ax.set(
        title="Held-out bits per byte during training (packed held-out sequences)",
        xlabel="optimizer step",
        ylabel="bits per UTF-8 byte (lower is better)",
    )
    ax.grid(alpha=0.3)
    _legend(ax, len(ax.get_lines()))
    return _save(fig, out / "heldout_bits_per_byte.png")


def plot_mixture(run: Metrics, out: Path) -> Path | None:
    keys = run.keys_like("mixture/")
    if not keys:
        return None
    domains = [k.split("/", 1)[1] for k in keys]
    colour = _colours(domains)
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for domain in domains:
        steps, values = run.steps(f"mixture/{domain}")
        ax.step(steps, values, where="post", color=colour[domain], label=domain, marker="o", markersize=3)
    _plot_weight_bounds(ax, run, domains, colour)
    ax.set(title="DDK domain weights", xlabel="optimizer step", ylabel="sampling weight (sums to 1)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    _legend(ax, sum(not line.get_label().startswith("_") for line in ax.get_lines()))
    return _save(fig, out / "ddk_weights.png")


def _plot_weight_bounds(ax: plt.Axes, run: Metrics, domains: list[str], colour: dict[str, str]) -> None:
    """DDK's guardrails as horizontal lines (dotted: minimum weight, dashed: maximum): one grey pair when
    every domain has the same bounds, else a pair per domain in its colour. Older runs logged none."""
    bounds = {}
    for domain in domains:
        low, high = run.steps(f"ddk/min_weight/{domain}")[1], run.steps(f"ddk/max_weight/{domain}")[1]
        if low and high:
            bounds[domain] = (low[-1], high[-1])
    if len(set(bounds.values())) == 1:
        low, high = next(iter(bounds.values()))
        ax.axhline(low, color="0.4", linestyle=":", linewidth=1, label="min weight")
        ax.axhline(high, color="0.4", linestyle="--", linewidth=1, label="max weight")
        return
    for domain, (low, high) in bounds.items():
        ax.axhline(low, color=colour[domain], linestyle=":", linewidth=1)
        ax.axhline(high, color=colour[domain], linestyle="--", linewidth=1)
    if bounds:  # the legend's key to the per-domain lines
        ax.plot([], [], color="0.4", linestyle=":", linewidth=1, label="min weight (domain colour)")
        ax.plot([], [], color="0.4", linestyle="--", linewidth=1, label="max weight (domain colour)")


def plot_tau(run: Metrics, out: Path) -> Path | None:
    steps, values = run.steps("taid/tau")
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot(steps, values, label="tau")
    ax.set(
        title="TAID interpolation tau",
        xlabel="optimizer step",
        ylabel="tau (0 = student, 1 = teacher; unitless)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, out / "taid_tau.png")


def plot_throughput(run: Metrics, out: Path) -> Path | None:
    steps, tokens = run.steps("tokens_per_s")
    if not steps:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, constrained_layout=True)
    top.plot(steps, tokens, label="tokens/s (whole job)")
    top.set(title="Throughput", ylabel="tokens per second")
    top.grid(alpha=0.3)
    top.legend(loc="best", fontsize="small")
    phases = run.keys_like("time/")
    if phases:
        series = [run.steps(k) for k in phases]
        common = sorted(set.intersection(*(set(s) for s, _ in series)))
        stacked = [[dict(zip(s, v, strict=True))[step] for step in common] for s, v in series]
        bottom.stackplot(common, stacked, labels=[k.split("/", 1)[1].replace("_", " ") for k in phases])
        bottom.set(title="Where a step's time goes", xlabel="optimizer step", ylabel="seconds per step")
        bottom.grid(alpha=0.3)
        _legend(bottom, len(phases) + 2)
    else:
        bottom.set_visible(False)
    return _save(fig, out / "throughput.png")
