"""Output layer + distillation loss: peak memory and time of forward+backward, ours (fused, chunked) vs
naive, side by side in one run, at tp1 and "under TP" (tp2: two gloo processes, V/2 of the layer each).

    .venv/bin/python bench/loss.py [--tokens 4096] [--hidden 512] [--vocab 32768] [--k 64] [--repeats 3]

From the student's last hidden states `[N, h]` through the output layer `[V, h]` to the forward-KL loss
against a cached top-k teacher (k ids, their log-probs and the tail mass), mean over tokens, and back to
the gradients of the hidden states and the output weight. Everything in fp32 on CPU.

- ours: `fused_output_loss` (chunks of ~16 MiB of fp32 logits, hand-written gradients);
- naive tp1 (`bench/loss_naive.py`): `logits = hidden @ W.T` (`[N, V]`), `log_softmax`, gather the k
  ids, KL over the kept ids plus the tail bucket (student tail = 1 - sum of kept q), autograd;
- naive tp2: each rank materialises its `[N, V/2]` logits and runs a plain vocab-parallel log-softmax
  (all-reduce MAX of the row max, all-reduce SUM of the exponentials and of the gathered kept values),
  autograd through it (all-reduce functions whose backward sums the partial gradients of replicated
  inputs used by rank-local math, and is the identity where every rank uses the sum alike).

Each variant runs in fresh processes (spawned from this file), so no variant sees another's allocations.
Memory: after the inputs exist, everything is imported, the process group is up and one warm-up
fwd+bwd on the first chunk's tokens has run (it sizes the math libraries' buffers; freed memory is then
handed back with malloc_trim), the resident-set high-water mark is reset (`/proc/self/clear_refs` 5) and
the baseline is the current RSS; peak extra = high-water mark after one full fwd+bwd - baseline. It
counts the gradients `[N, h]` and `[V/tp, h]` every variant has to produce. A second measure, the peak of
live tensor bytes (torch profiler's allocation events), is independent of malloc: the RSS also holds what
glibc keeps of freed blocks (after the first ~16 MiB block is freed its dynamic mmap threshold serves
the next ones from its heap, which fragments and is not handed back), so for ours it varies from run to
run by a few tens of MiB; `MALLOC_MMAP_THRESHOLD_=1048576` in the environment (the children inherit it)
fixes the threshold. Time:
median of `--repeats` further fwd+bwd. Agreement: loss and gradients of every variant against naive tp1
(tp2 weight gradients are concatenated over the ranks).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, write_result
from loss_naive import naive_loss

VARIANTS = (("naive", 1), ("ours", 1), ("naive", 2), ("ours", 2))
CORES = 2


# ---------------------------------------------------------------- inputs (parent)


def make_inputs(path: Path, tokens: int, hidden: int, vocab: int, k: int, seed: int = 0) -> dict:
    """Student hidden states and output layer, and a top-k teacher from a related random layer
    (so the teacher's kept ids carry real student mass), computed in chunks of tokens."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen).mul_(2.0 / hidden**0.5)  # student logits std ~2
    w_t = (w + torch.randn(vocab, hidden, generator=gen).mul_(1.5 / hidden**0.5)).mul_(1.2)
    ids, kept, tails = [], [], []
    for rows in torch.arange(tokens).split(256):
        lp = torch.log_softmax(h[rows] @ w_t.t(), -1)
        values, idx = lp.topk(k, -1)
        ids.append(idx)
        kept.append(values)
        tails.append((1 - values.exp().sum(-1)).clamp_min(0))
    inputs = {
        "hidden": h,
        "weight": w,
        "labels": torch.randint(vocab, (tokens,), generator=gen),
        "ids": torch.cat(ids),
        "logprobs": torch.cat(kept),
        "tail": torch.cat(tails),
    }
    torch.save(inputs, path)
    return {"teacher_tail_mean": float(inputs["tail"].mean())}


# ---------------------------------------------------------------- one variant, measured (child)


def _rss_mib() -> tuple[float, float]:
    """(current RSS, high-water mark) of this process in MiB."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            found[line[:5]] = int(line.split()[1]) / 1024
    return found["VmRSS"], found["VmHWM"]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _live_tensor_peak_mib(step, trace: Path) -> float:
    """Peak of live tensor bytes allocated during `step()` (torch profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    trace.unlink()
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]  # in recording order
    # the profiler's running total of the bytes allocated since it started (exact, unlike summing
    # the events by their microsecond timestamps, which tie)
    peak = max((m["Total Allocated"] for m in memory), default=0)
    return peak / 2**20


def child(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from distill.losses.fused import Terms, fused_output_loss
    from distill.losses.signal import TopKSignal
    from parallel.vocab import VocabShard

    torch.set_num_threads(max(1, CORES // args.tp))
    rank, tp = args.rank, args.tp
    group = None
    if tp > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=tp)
        group = dist.group.WORLD
    inputs = torch.load(args.inputs)
    vocab = inputs["weight"].shape[0]
    shard = VocabShard.of(vocab, rank, tp, group)
    weight = inputs.pop("weight")[shard.start : shard.start + shard.size].clone().requires_grad_()
    hidden = inputs["hidden"].requires_grad_()
    labels, ids, logprobs, tail = inputs["labels"], inputs["ids"], inputs["logprobs"], inputs["tail"]
    n = hidden.shape[0]
    terms = Terms(weights={"forward_kl": 1.0}, temperature=1.0)

    def loss_of(rows: slice) -> torch.Tensor:
        if args.variant == "ours":
            teacher = TopKSignal(ids[rows], logprobs[rows], tail[rows], vocab)
            loss_sum, _ = fused_output_loss(
                hidden[rows], weight, labels[rows], terms=terms, shard=shard, teacher=teacher
            )
            return loss_sum / (rows.stop - rows.start)
        return naive_loss(hidden[rows], weight, ids[rows], logprobs[rows], tail[rows], tp, shard.start)

    def step(rows: slice = slice(0, n)) -> torch.Tensor:
        hidden.grad = weight.grad = None
        loss = loss_of(rows)
        loss.backward()
        return loss.detach()

    step(slice(0, terms.chunk(shard.size)))  # warm-up on one chunk's tokens
    hidden.grad = weight.grad = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    if tp > 1:
        dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark to the current RSS
    baseline, _ = _rss_mib()
    loss = step()
    _, peak = _rss_mib()
    torch.save(
        {"loss": loss, "grad_hidden": hidden.grad, "grad_weight": weight.grad}, f"{args.out}.{rank}.pt"
    )
    times, cpu_times = [], []
    for _ in range(args.repeats):
        if tp > 1:
            dist.barrier()
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        step()
        times.append(time.perf_counter() - started)
        cpu_times.append(_cpu_seconds() - cpu_started)
    tensor_peak = _live_tensor_peak_mib(step, Path(f"{args.out}.{rank}.trace.json"))
    Path(f"{args.out}.{rank}.json").write_text(
        json.dumps(
            {
                "baseline_rss_mib": baseline,
                "peak_extra_mib": peak - baseline,
                "tensor_peak_mib": tensor_peak,
                "seconds": statistics.median(times),
                "cpu_seconds": statistics.median(cpu_times),
                "warmup_tokens": terms.chunk(shard.size),
                **({"chunk_tokens": terms.chunk(shard.size)} if args.variant == "ours" else {}),
            }
        )
    )
    if tp > 1:
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- driver (parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant: str, tp: int, inputs: Path, tmp: Path, repeats: int) -> dict:
    out = tmp / f"{variant}-tp{tp}"
    port = str(_free_port())
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, CORES // tp)),
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }
    logs = [(tmp / f"{out.name}.{rank}.log").open("w") for rank in range(tp)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--tp",
                str(tp),
                "--rank",
                str(rank),
                "--port",
                port,
                "--inputs",
                str(inputs),
                "--out",
                str(out),
                "--repeats",
                str(repeats),
            ],
            env=env,
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
        )
        for rank in range(tp)
    ]
    failed = [rank for rank, p in enumerate(procs) if p.wait() != 0]
    for log in logs:
        log.close()
    if failed:
        for rank in failed:
            print((tmp / f"{out.name}.{rank}.log").read_text(), file=sys.stderr)
        raise SystemExit(f"{variant} tp{tp}: rank(s) {failed} failed")
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(tp)]
    saved = [torch.load(f"{out}.{r}.pt") for r in range(tp)]
    return {
        "peak_extra_mib_per_rank": max(r["peak_extra_mib"] for r in ranks),
        "tensor_peak_mib_per_rank": max(r["tensor_peak_mib"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
        "cpu_seconds": sum(r["cpu_seconds"] for r in ranks),
        **({"chunk_tokens": ranks[0]["chunk_tokens"]} if variant == "ours" else {}),
        "ranks": ranks,
        "_loss": saved[0]["loss"],
        "_grad_hidden": saved[0]["grad_hidden"],
        "_grad_weight": torch.cat([s["grad_weight"] for s in saved]),
    }


def agreement(result: dict, reference: dict) -> dict:
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    return {
        "loss": float(result["_loss"]),
        "loss_abs_diff": float((result["_loss"] - reference["_loss"]).abs()),
        "grad_hidden_max_rel_diff": rel(result["_grad_hidden"], reference["_grad_hidden"]),
        "grad_weight_max_rel_diff": rel(result["_grad_weight"], reference["_grad_weight"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "loss.json"))
    parser.add_argument("--child", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        inputs = tmp / "inputs.pt"
        info = make_inputs(inputs, args.tokens, args.hidden, args.vocab, args.k)
        runs = {}
        for variant, tp in VARIANTS:
            runs[f"{variant}_tp{tp}"] = run_variant(variant, tp, inputs, tmp, args.repeats)
            print(f"{variant} tp{tp}: done", flush=True)
    reference = runs["naive_tp1"]
    checks = {name: agreement(run, reference) for name, run in runs.items() if name != "naive_tp1"}
    agree = all(
        c["loss_abs_diff"] <= args.tolerance
        and c["grad_hidden_max_rel_diff"] <= args.tolerance
        and c["grad_weight_max_rel_diff"] <= args.tolerance
        for c in checks.values()
    )
    variants = {name: {k: v for k, v in run.items() if not k.startswith("_")} for name, run in runs.items()}

    def ratio(a: str, b: str, key: str) -> float:
        return variants[a][key] / variants[b][key]

    result = {
        "sizes": {
            "tokens": args.tokens,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "k": args.k,
            "dtype": "float32",
            "threads": CORES,
            "logits_fp32_mib": args.tokens * args.vocab * 4 / 2**20,
            **info,
        },
        "measured_code_sha256": {  # the loss code under test changes: which version these numbers are of
            f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:12]
            for f in ("distill/losses/fused.py", "distill/losses/divergences.py", "parallel/vocab.py")
        },
        "variants": variants,
        "ratios": {
            "memory_naive_over_ours_tp1": ratio("naive_tp1", "ours_tp1", "peak_extra_mib_per_rank"),
            "memory_naive_over_ours_tp2": ratio("naive_tp2", "ours_tp2", "peak_extra_mib_per_rank"),
            "tensor_memory_naive_over_ours_tp1": ratio("naive_tp1", "ours_tp1", "tensor_peak_mib_per_rank"),
            "tensor_memory_naive_over_ours_tp2": ratio("naive_tp2", "ours_tp2", "tensor_peak_mib_per_rank"),
            "time_naive_over_ours_tp1": ratio("naive_tp1", "ours_tp1", "seconds"),
            "time_naive_over_ours_tp2": ratio("naive_tp2", "ours_tp2", "seconds"),
            "cpu_time_naive_over_ours_tp1": ratio("naive_tp1", "ours_tp1", "cpu_seconds"),
            "cpu_time_naive_over_ours_tp2": ratio("naive_tp2", "ours_tp2", "cpu_seconds"),
        },
        "agreement": {"reference": "naive_tp1", "tolerance": args.tolerance, "agree": agree, **checks},
    }
    print(
        f"\n{'variant':<10} {'RSS peak extra MiB/rank':>24} {'tensor peak MiB/rank':>21}"
        f" {'s/fwd+bwd':>10} {'cpu s/fwd+bwd':>14}"
    )
    for name, v in variants.items():
        print(
            f"{name:<10} {v['peak_extra_mib_per_rank']:>24.1f} {v['tensor_peak_mib_per_rank']:>21.1f}"
            f" {v['seconds']:>10.3f} {v['cpu_seconds']:>14.3f}"
        )
    r = result["ratios"]
    for tp in (1, 2):
        print(
            f"naive/ours tp{tp}: RSS memory {r[f'memory_naive_over_ours_tp{tp}']:.2f}, tensor memory"
            f" {r[f'tensor_memory_naive_over_ours_tp{tp}']:.2f}, time {r[f'time_naive_over_ours_tp{tp}']:.2f},"
            f" cpu time {r[f'cpu_time_naive_over_ours_tp{tp}']:.2f}"
        )
    for name, c in checks.items():
        print(
            f"{name} vs naive_tp1: |d loss| {c['loss_abs_diff']:.2e}, grad_hidden rel {c['grad_hidden_max_rel_diff']:.2e},"
            f" grad_weight rel {c['grad_weight_max_rel_diff']:.2e}"
        )
    print(f"agree within {args.tolerance:g}: {agree}\n")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
