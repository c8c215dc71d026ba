"""`distillery report RUN_DIR`: PNG plots and a `report.md` a person reads after (or during) a run.

Reads the run's `metrics.jsonl`, its CE-only baseline's when there is one, and `eval.json` (final
held-out bits per byte of teacher, student and baseline); where they are comes from the resolved
`config.yaml` the campaign writes into the run directory, else the campaign's default layout
(`metrics.jsonl`, `baseline/metrics.jsonl`, `eval/eval.json`). Output (`RUN_DIR/report/` unless told)
is written whole and atomically, so a report being rebuilt is never seen half-done.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean
from typing import Any

import yaml

from distill.atomic import atomic_directory, read_json
from distill.errors import DataError
from distill.eval_table import table_rows
from distill.messages import say
from distill.report.metrics_file import Metrics, read_metrics
from distill.report.plots import plot_bits_per_byte, plot_losses, plot_mixture, plot_tau, plot_throughput

REPORT = "report.md"


def run_layout(run_dir: Path) -> dict[str, Any]:
    """Where a run keeps its metrics, its baseline's and its eval (from config.yaml when present)."""
    run_dir = Path(run_dir)
    layout: dict[str, Any] = {
        "name": run_dir.name,
        "metrics": run_dir / "metrics.jsonl",
        "baseline_metrics": run_dir / "baseline" / "metrics.jsonl",
        "eval": run_dir / "eval" / "eval.json",
        "config": {},
    }
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        try:
            config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{config_file} is not valid YAML: {exc}") from None
        layout["config"] = config
        layout["name"] = (config.get("run") or {}).get("name", layout["name"])
        if (config.get("logging") or {}).get("metrics"):
            layout["metrics"] = Path(config["logging"]["metrics"])
        if config.get("baseline"):
            layout["baseline_metrics"] = Path(config["baseline"]["dir"]) / "metrics.jsonl"
        if config.get("eval"):
            layout["eval"] = Path(config["eval"]["dir"]) / "eval.json"
        if config.get("prune"):
            layout["step0"] = Path(config["prune"]["dir"]) / "step0" / "eval.json"
    return layout


def build_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the plots and report.md of the run in `run_dir`; returns the report directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist")
    layout = run_layout(run_dir)
    run = read_metrics(layout["metrics"])
    baseline = read_metrics(layout["baseline_metrics"]) if layout["baseline_metrics"].is_file() else None
    evaluation = read_json(layout["eval"]) if layout["eval"].is_file() else None
    out = Path(out) if out is not None else run_dir / "report"
    with atomic_directory(out, overwrite=True) as tmp:
        plots = [
            plot_losses(run, baseline, tmp),
            plot_bits_per_byte(run, baseline, tmp),
            plot_mixture(run, tmp),
            plot_tau(run, tmp),
            plot_throughput(run, tmp),
        ]
        text = render_report(layout, run, baseline, evaluation, [p.name for p in plots if p is not None])
        (tmp / REPORT).write_text(text, encoding="utf-8")
    say("report", f"wrote {out / REPORT} and {sum(p is not None for p in plots)} plots")
    return out


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _facts(layout: dict[str, Any], run: Metrics) -> list[str]:
    config = layout["config"]
    training = config.get("training") or {}
    steps, _ = run.steps("loss")
    tokens_per_step = run.last("tokens_per_step")
    peak = run.last("peak_tflops")
    mfu_steps, mfu = run.steps("mfu")
    _, tflops = run.steps("tflops_per_device")
    _, throughput = run.steps("tokens_per_s")
    device = run.last("device") or "not recorded"
    facts = [
        ("device", f"{device} x {_fmt(run.last('devices'))}"),
        ("student parameters", _fmt(run.last("student_parameters"), ",")),
        ("steps logged", f"{len(steps)} (last step {steps[-1]})" if steps else "-"),
        ("tokens per step", _fmt(tokens_per_step, ",")),
        ("tokens seen", _fmt(steps[-1] * tokens_per_step, ",") if steps and tokens_per_step else "-"),
        (
            "loss weights",
            ", ".join(f"{k} {v:g}" for k, v in ((config.get("loss") or {}).get("weights") or {}).items() if v)
            or "-",
        ),
        ("teacher", (config.get("teacher") or {}).get("path", "-")),
        ("parallel layout", ", ".join(f"{k} {v}" for k, v in (config.get("parallel") or {}).items()) or "-"),
        (
            "global batch x seq",
            f"{training.get('global_batch', '-')} x {(config.get('data') or {}).get('seq_len', '-')}",
        ),
        ("final loss", _fmt(run.last("loss"))),
        ("mean tokens/s", _fmt(mean(throughput), ",.0f") if throughput else "-"),
        ("model TFLOP/s per device", _fmt(mean(tflops), ".4f") if tflops else "-"),
        (
            "MFU",
            f"{mean(mfu):.1%} of {peak:g} TFLOP/s"
            if mfu_steps and isinstance(peak, int | float)
            else "not estimated: no peak known for this device (set training.peak_tflops)",
        ),
        ("peak host memory (main rank)", f"{_fmt(run.last('memory/host_peak_gib'), '.2f')} GiB"),
    ]
    if run.last("memory/cuda_peak_gib") is not None:
        facts.append(("peak CUDA memory (main rank)", f"{_fmt(run.last('memory/cuda_peak_gib'), '.2f')} GiB"))
    phases = run.keys_like("time/")
    if phases:
        split = ", ".join(f"{k.split('/', 1)[1]} {mean(run.steps(k)[1]):.3f}s" for k in phases)
        facts.append(("mean step time split", split))
    if run.skipped_lines:
        facts.append(("unreadable metric lines skipped", str(run.skipped_lines)))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts)]


def _final_table(evaluation: dict[str, Any]) -> list[str]:
    names = list(evaluation["models"])
    head = "| domain | " + " | ".join(f"{n} bits/byte | {n} ppl" for n in names) + " |"
    rows = [head, "|---" * (2 * len(names) + 1) + "|"]
    for domain, scores in table_rows(evaluation, names):
        cells = [
            _fmt(s and s[key], spec)
            for s in scores
            for key, spec in (("bits_per_byte", ".4f"), ("ppl", ".2f"))
        ]
        rows.append(f"| {domain} | " + " | ".join(cells) + " |")
    p = evaluation["protocol"]
    note = (
        f"Documents of the first {p['sequences']} held-out sequences per domain, lm-eval rolling windows of "
        f"{p['max_len']} tokens, {p['dtype']}; bits per byte is comparable across tokenizers, perplexity is not."
    )
    return [*rows, "", note]


def render_report(
    layout: dict[str, Any],
    run: Metrics,
    baseline: Metrics | None,
    evaluation: dict[str, Any] | None,
    plots: list[str],
) -> str:
    lines = [f"# Report: {layout['name']}", "", "## Final held-out evaluation", ""]
    if evaluation is not None:
        lines += _final_table(evaluation)
    else:
        lines.append(
            f"No eval.json at {layout['eval']}: run `distillery eval` (or the campaign's eval stage)."
        )
    if layout.get("step0") is not None and layout["step0"].is_file():
        prune = layout["config"]["prune"]
        lines += [
            "",
            "## The pruned student at step 0",
            "",
            f"Before any training: the student pruned from the teacher (method {prune['method']}, "
            f"{prune['calibration_sequences']} calibration sequences) beside a random init of the same "
            "architecture (the run's seed).",
            "",
            *_final_table(read_json(layout["step0"])),
        ]
    lines += ["", "## Run", "", *_facts(layout, run)]
    if baseline is not None:
        lines += ["", f"CE-only baseline: final loss {_fmt(baseline.last('loss'))} ({baseline.path})."]
    lines += ["", "## Plots", ""]
    titles = {
        "loss.png": "Loss terms",
        "heldout_bits_per_byte.png": "Held-out bits per byte over training (teacher as dashed lines)",
        "ddk_weights.png": "DDK domain weights",
        "taid_tau.png": "TAID tau",
        "throughput.png": "Throughput and step-time split",
    }
    for name in plots:
        lines += [f"### {titles.get(name, name)}", "", f"![{titles.get(name, name)}]({name})", ""]
    return "\n".join(lines)
