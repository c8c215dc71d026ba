"""What each distillation method buys at equal tokens, in held-out bits per byte, with its seed noise
(not run by CI; ~80 min here for `same`, ~60 min for `cross`).

    .venv/bin/python bench/quality.py [--suite same|cross] [--steps N] [--seeds 1234 1235 1236] [--methods ...]

`--suite same` (the default): on the demo corpus and teacher, the demo student is trained from the same random init (one per seed)
for the same steps and batches (equal tokens) with:

- `ce`: next-token cross-entropy only (the baseline);
- `topk64`, `topk8`: forward KL against a top-k cache (k = 64, and a small k = 8) with its tail bucket;
- `rskd`: forward KL against the sampled cache (RS-KD, 50 draws per position: the demo's default);
- `online`: forward KL against the live teacher's full distribution (dense, no cache);
- `taid`: TAID against the top-64 cache;
- `taid_ddk`: TAID with the DDK domain mixture (reweighted every 30 steps, the default guardrails);
- `rskd_ddk`: RS-KD with the DDK domain mixture (the same schedule);
- `taid_ddk_raw`: TAID + DDK without guardrails (no weight bounds, no smoothing of the update).

Each student is then scored by `distillery eval` (documents of the first 32 held-out sequences per
domain, rolling windows) in bits per byte. Every method runs with each seed (the seed sets the student's
random init and the batches); the table gives per domain the mean and the spread (max - min over the
seeds), and calls a difference to CE (or to the same loss without DDK, for the DDK rows) a win or a loss
only where it is larger than the spreads of both sides; likewise the worst domain's gap to the teacher
(DDK's aim: that gap shrinks, the mean does not grow). Each finished run is saved at once, and a rerun with the same
steps and seeds keeps the runs of the methods it does not run, so methods can be added one at a time.
Runs at tp1 in this process; the caches are built first (the demo's sampled cache, top-k beside it).

`--suite cross`: `configs/demo_uld.yaml` (the demo teacher into a student with its own Unigram), every
method on CE (weight 1) plus: nothing (`ce`), `uld` (0.5; `uld_positional`: the paper's n-th with n-th
alignment; `uld_hybrid`: identical-bytes ids by KL), `span` (1.0), `uld_span` (both), `projected`
(projected_kl 1.0), `projected_span` (projected_kl and span), `projected_uld_span` (all three),
`projected_light_span` and `projected_light_uld_span` (projected_kl 0.3: the demo config's default is
the first), all from the top-64 cache over the teacher sequences, for the demo's own 150 steps; each
compared with `ce` (results in `quality_cross.json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, ensure_data_stages, write_result

KD = ["loss.weights.ce=0.0", "loss.weights.forward_kl=1.0"]
TAID = ["loss.weights.ce=0.0", "loss.weights.forward_kl=0.0", "loss.weights.taid=1.0"]
DDK = ["data.mixture.type=ddk", "data.mixture.interval=30"]
NO_GUARDRAILS = ["data.mixture.min_weight=0.0", "data.mixture.max_weight=1.0", "data.mixture.smoothing=0.0"]
METHODS = {
    "ce": ("none", ["loss.weights.ce=1.0", "loss.weights.forward_kl=0.0"]),
    "topk64": ("topk64", KD),
    "topk8": ("topk8", KD),
    "rskd": ("sampled", KD),
    "online": ("online", KD),
    "taid": ("topk64", TAID),
    "taid_ddk": ("topk64", TAID + DDK),
    "rskd_ddk": ("sampled", KD + DDK),
    "taid_ddk_raw": ("topk64", TAID + DDK + NO_GUARDRAILS),
}


def cross(
    uld: float = 0.0, span: float = 0.0, projected_kl: float = 0.0, *extra: str
) -> tuple[str, list[str]]:
    """A cross-tokenizer method on CE (weight 1): every term's weight set, whatever the config's default."""
    weights = [
        f"loss.weights.uld={uld}",
        f"loss.weights.span={span}",
        f"loss.weights.projected_kl={projected_kl}",
    ]
    return ("cache" if uld or span or projected_kl else "none"), [*weights, *extra]


CROSS_METHODS = {
    "ce": cross(),
    "uld": cross(uld=0.5),
    "uld_positional": cross(0.5, 0.0, 0.0, "loss.uld.alignment=positional"),
    "uld_hybrid": cross(0.5, 0.0, 0.0, "loss.uld.hybrid=true"),
    "span": cross(span=1.0),
    "uld_span": cross(uld=0.5, span=1.0),
    "projected": cross(projected_kl=1.0),
    "projected_span": cross(span=1.0, projected_kl=1.0),
    "projected_uld_span": cross(uld=0.5, span=1.0, projected_kl=1.0),
    "projected_light_span": cross(span=1.0, projected_kl=0.3),
    "projected_light_uld_span": cross(uld=0.5, span=1.0, projected_kl=0.3),
}
SUITES = {
    "same": ("demo.yaml", METHODS, "quality.json", 300),
    "cross": ("demo_uld.yaml", CROSS_METHODS, "quality_cross.json", 150),  # the demo config's own steps
}
# What each method's gains are measured against: the CE student, or the same method without DDK.
REFERENCE = {"taid_ddk": "taid", "taid_ddk_raw": "taid", "rskd_ddk": "rskd"}


def teacher_overrides(signal: str, caches: dict[str, Path], base) -> list[str]:
    if signal == "cache":  # the config's own cache (its path may hang off run.dir, which each run moves)
        return [f"cache.dir={base.cache.dir}"]
    if signal == "online":
        return ["teacher.mode=online", "cache=null"]
    if signal == "none":
        return ["cache=null", "teacher=null"]
    return [f"cache.dir={caches[signal]}"] + (
        ["cache.mode=topk", f"cache.k={signal.removeprefix('topk')}"] if signal.startswith("topk") else []
    )


def build_caches(config_path: str, base, root: Path) -> dict[str, Path]:
    """The demo's sampled cache, and top-k caches of k = 64 and 8 next to it (each built once)."""
    from distill.config import load_config
    from launcher.campaign import RunOptions, run_stages

    caches = {"sampled": base.cache.dir}
    for k in (64, 8):
        caches[f"topk{k}"] = root / f"cache-topk{k}"
        config = load_config(
            config_path,
            [
                f"cache.dir={caches[f'topk{k}']}",
                "cache.mode=topk",
                f"cache.k={k}",
                "loss.weights.forward_kl=0.0",
                "loss.weights.ce=1.0",
            ],
        )
        run_stages(config, ["cache"], RunOptions(progress=False))
    return caches


def train_and_score(
    config_path: str, base, overrides: list[str], tmp: str, name: str, seed: int, steps: int
) -> dict:
    from distill.config import load_config
    from distill.data.prepared import PreparedData
    from distill.eval.score import score_model
    from distill.training.train import build_loop
    from parallel.distributed import init_parallel, shutdown

    config = load_config(
        config_path,
        [
            f"run.dir={tmp}/{name}-{seed}",
            f"data.dir={base.data.dir}",
            f"data.tokenizer.path={base.data.tokenizer.path}",
            f"student.init_dir={tmp}/student-init-{seed}",
            f"training.steps={steps}",
            f"training.seed={seed}",
            "training.log_interval=50",
            "training.eval_interval=0",
            "checkpoint.interval=1000000",
            "parallel.tp=1",
            "parallel.pp=1",
            "baseline=null",
            "eval=null",
            *overrides,
        ],
    )
    ctx = init_parallel(1, 1, seed=seed)
    started = time.perf_counter()
    loop = build_loop(config, ctx)
    trained = loop.run()
    seconds = time.perf_counter() - started
    shutdown()
    scores = score_model(config.checkpoint.dir, PreparedData(base.data.dir), sequences=32, progress=False)
    return {
        "bits_per_byte": {d: s["bits_per_byte"] for d, s in scores["domains"].items()},
        "all": scores["all"]["bits_per_byte"],
        "final_train_loss": trained[-1].loss,
        "seconds_per_step": seconds / steps,
    }


def summarize(runs: dict[str, dict[str, dict]], teacher: dict[str, float]) -> dict[str, dict]:
    """Per method and domain (and `all`): mean and spread (max - min) over seeds, the worst domain's gap
    to the teacher, and each difference to the reference method called a win or loss only beyond noise."""
    summary: dict[str, dict] = {}
    for name, by_seed in runs.items():
        results = list(by_seed.values())
        columns = [*results[0]["bits_per_byte"], "all"]
        per_seed = [{**r["bits_per_byte"], "all": r["all"]} for r in results]
        gaps = [_worst_gap(r, teacher) for r in results]
        summary[name] = {
            "seeds": len(results),
            "mean": {c: statistics.mean(s[c] for s in per_seed) for c in columns},
            "spread": {c: max(s[c] for s in per_seed) - min(s[c] for s in per_seed) for c in columns},
            "worst_gap_to_teacher": {"mean": statistics.mean(gaps), "spread": max(gaps) - min(gaps)},
            "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in results),
        }
    for name, entry in summary.items():
        reference = REFERENCE.get(name, "ce")
        if name == reference or reference not in summary:
            continue
        other = summary[reference]
        seeds = sorted(set(runs[name]) & set(runs[reference]))
        verdicts = {}
        for column in entry["mean"]:
            # bits per byte saved (> 0 is better), over the seeds both ran: the difference of the means
            # when they ran the same seeds
            paired = [_value(runs[reference][s], column) - _value(runs[name][s], column) for s in seeds]
            gain = statistics.mean(paired)
            noise = max(entry["spread"][column], other["spread"][column])
            call = _call(gain, noise) if min(entry["seeds"], other["seeds"]) > 1 else "one seed"
            verdicts[column] = {"gain": gain, "noise": noise, "call": call, "paired": paired}
        paired = [_worst_gap(runs[reference][s], teacher) - _worst_gap(runs[name][s], teacher) for s in seeds]
        gain = statistics.mean(paired)
        noise = max(other["worst_gap_to_teacher"]["spread"], entry["worst_gap_to_teacher"]["spread"])
        verdicts["worst_gap_to_teacher"] = {
            "gain": gain,
            "noise": noise,
            "call": _call(gain, noise) if min(entry["seeds"], other["seeds"]) > 1 else "one seed",
            "paired": paired,
        }
        entry["versus"] = {"method": reference, "seeds": seeds, "columns": verdicts}
    return summary


def _value(run: dict, column: str) -> float:
    return run["all"] if column == "all" else run["bits_per_byte"][column]


def _worst_gap(run: dict, teacher: dict[str, float]) -> float:
    """The largest student - teacher bits per byte over the domains (DDK's target)."""
    return max(run["bits_per_byte"][d] - teacher[d] for d in run["bits_per_byte"])


def _call(gain: float, noise: float) -> str:
    return "win" if gain > noise else "loss" if -gain > noise else "within noise"


def markdown(result: dict) -> str:
    """The docs' tables: per method and domain `mean ± spread/2` over the seeds (bold: a win against its
    reference beyond both spreads, italic: such a loss), the worst domain's gap to the teacher; then the
    gain against the reference, mean (per-seed min..max of the paired differences) and the call."""
    summary, teacher = result["summary"], result["teacher"]
    columns = [*teacher["domains"], "all"]
    head = ["method", *columns, "worst gap to teacher", "s/step"]
    rows = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| teacher | "
        + " | ".join(f"{teacher['domains'].get(c, teacher['all']):.3f}" for c in columns)
        + " | | |",
    ]
    for name, entry in summary.items():
        cells = []
        for column in [*columns, "worst_gap_to_teacher"]:
            if column == "worst_gap_to_teacher":
                mean, spread = entry[column]["mean"], entry[column]["spread"]
            else:
                mean, spread = entry["mean"][column], entry["spread"][column]
            cell = f"{mean:.3f} ± {spread / 2:.3f}"
            verdict = entry.get("versus", {}).get("columns", {}).get(column)
            if verdict and verdict["call"] in ("win", "loss"):
                cell = f"**{cell}**" if verdict["call"] == "win" else f"_{cell}_"
            cells.append(cell)
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {entry['seconds_per_step']:.2f} |")
    rows += ["", "| gain (bits/byte) | against | " + " | ".join([*columns, "worst gap"]) + " |"]
    rows.append("|" + "---|" * (len(columns) + 3))
    for name, entry in summary.items():
        if "versus" not in entry:
            continue
        versus = entry["versus"]
        cells = []
        for column in [*columns, "worst_gap_to_teacher"]:
            verdict = versus["columns"][column]
            low, high = min(verdict["paired"]), max(verdict["paired"])
            cells.append(f"{verdict['gain']:+.3f} ({low:+.3f}..{high:+.3f}) {verdict['call']}")
        rows.append(f"| {name} | {versus['method']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def load_runs(out: str, steps: int, seeds: list[int]) -> dict[str, dict[str, dict]]:
    """The runs of an earlier call with the same steps and seeds (others are not comparable)."""
    path = Path(out)
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("steps") != steps or earlier.get("seeds") != seeds:
        return {}
    return earlier.get("runs", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=list(SUITES), default="same")
    parser.add_argument("--config", default=None, help="default: the suite's demo config")
    parser.add_argument("--steps", type=int, default=None, help="default: 300 (same), 150 (cross)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the suite")
    parser.add_argument("--out", default=None, help="default: bench/results/quality[_cross].json")
    parser.add_argument("--table", action="store_true", help="print the docs' table of --out and stop")
    args = parser.parse_args()
    config_name, methods, out_name, steps = SUITES[args.suite]
    args.steps = args.steps or steps
    args.config = args.config or str(REPO / "configs" / config_name)
    args.out = args.out or str(REPO / "bench" / "results" / out_name)
    args.methods = args.methods or list(methods)
    unknown = sorted(set(args.methods) - set(methods))
    if unknown:
        parser.error(f"--methods {unknown} are not in suite {args.suite}: {list(methods)}")
    if args.table:
        result = json.loads(Path(args.out).read_text())
        result["summary"] = summarize(result["runs"], result["teacher"]["domains"])
        print(markdown(result))
        return

    from distill.data.prepared import PreparedData
    from distill.eval.score import score_model

    base = ensure_data_stages(args.config, ("corpus", "tokenizer", "prepare", "cache"))
    caches = build_caches(args.config, base, base.run.dir / "bench") if args.suite == "same" else {}
    scored = score_model(base.teacher.path, PreparedData(base.data.dir), sequences=32, progress=False)
    teacher = {d: s["bits_per_byte"] for d, s in scored["domains"].items()}
    runs = load_runs(args.out, args.steps, args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            signal, overrides = methods[name]
            runs[name] = {}
            for seed in args.seeds:
                result = train_and_score(
                    args.config,
                    base,
                    teacher_overrides(signal, caches, base) + overrides,
                    tmp,
                    name,
                    seed,
                    args.steps,
                )
                runs[name][str(seed)] = result
                print(
                    f"{name} seed {seed}: {result['all']:.4f} bits/byte, {result['seconds_per_step']:.2f} s/step",
                    flush=True,
                )
                write_result(
                    args.out,
                    {
                        "steps": args.steps,
                        "tokens": args.steps * base.training.global_batch * base.data.seq_len,
                        "seeds": args.seeds,
                        "teacher": {"all": scored["all"]["bits_per_byte"], "domains": teacher},
                        "summary": summarize(runs, teacher),
                        "runs": runs,
                    },
                    echo=False,
                )
    print(markdown(json.loads(Path(args.out).read_text())))


if __name__ == "__main__":
    main()
