"""Output layer + top-k distillation loss on one device: peak memory and time of forward+backward, the
fused loss vs the naive one, side by side in one process (the GPU counterpart of bench/loss.py).

    python bench/loss_memory.py [--tokens 8192] [--hidden 2048] [--vocab 128256] [--k 64] [--repeats 5]

The defaults are one micro-batch of a ~1B student (4 x 2048 tokens, h 2048) at a Llama-3 vocabulary.
Inputs as bench/loss.py makes them (student hidden states and output layer, a top-k teacher from a
related layer), in bf16 on CUDA (what the student's last stage hands over), float32 on CPU:

- naive (`bench/loss_naive.py`): `[N, V]` logits in fp32, `log_softmax`, forward KL over the kept ids
  plus the tail bucket, autograd;
- ours: `fused_output_loss` (chunks of logits, hand-written gradients), at its automatic chunk size and
  at the chunk sizes in `--chunks`, in full fp32; on CUDA also with TF32 matmuls (`ours_tf32`: what
  training uses by default, `loss.tf32`; its gradients are not held to `--tolerance`).

Memory: on CUDA the allocator's peak during one fwd+bwd above what was allocated before it (inputs and
weights excluded, gradients included); on CPU the torch profiler's peak of live tensor bytes. Time: the
median of `--repeats` fwd+bwd (synchronised on CUDA). Agreement: loss and gradients of each variant vs
naive, relative norm of the difference, within `--tolerance` (bf16 inputs: the two fp32 computations
differ by summation order only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, write_result
from loss import _live_tensor_peak_mib
from loss_naive import naive_loss


def make_inputs(
    tokens: int, hidden: int, vocab: int, k: int, device: torch.device, dtype: torch.dtype
) -> dict:
    """bench/loss.py's inputs, built on `device` in chunks (the teacher's top-k from a related layer)."""
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen, device=device)
    w = torch.randn(vocab, hidden, generator=gen, device=device).mul_(2.0 / hidden**0.5)
    w_t = (w + torch.randn(vocab, hidden, generator=gen, device=device).mul_(1.5 / hidden**0.5)).mul_(1.2)
    ids, kept, tails = [], [], []
    for rows in torch.arange(tokens, device=device).split(1024):
        lp = torch.log_softmax(h[rows] @ w_t.t(), -1)
        values, idx = lp.topk(k, -1)
        ids.append(idx)
        kept.append(values)
        tails.append((1 - values.exp().sum(-1)).clamp_min(0))
    del w_t
    return {
        "hidden": h.to(dtype),
        "weight": w.to(dtype),
        "labels": torch.randint(vocab, (tokens,), generator=gen, device=device),
        "ids": torch.cat(ids),
        "logprobs": torch.cat(kept),
        "tail": torch.cat(tails),
    }


def measure(name: str, loss_of, inputs: dict, device: torch.device, repeats: int) -> dict:
    hidden = inputs["hidden"].detach().clone().requires_grad_()
    weight = inputs["weight"].detach().clone().requires_grad_()

    def step() -> torch.Tensor:
        hidden.grad = weight.grad = None
        loss = loss_of(hidden, weight)
        loss.backward()
        return loss.detach()

    step()  # warm-up: kernels, allocator, math library buffers
    hidden.grad = weight.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        loss = step()
        with tempfile.TemporaryDirectory() as tmp:
            peak = _live_tensor_peak_mib(step, Path(tmp) / "trace.json")
    grads = (hidden.grad.float().clone(), weight.grad.float().clone())
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    print(
        f"loss_memory: {name}: peak {peak:,.0f} MiB, {statistics.median(times) * 1e3:.1f} ms", file=sys.stderr
    )
    return {"peak_mib": peak, "seconds": statistics.median(times), "loss": float(loss), "grads": grads}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", default="1024,4096", help="further chunk sizes of ours (tokens)")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "loss_memory.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from distill.losses.fused import Terms, fused_output_loss
    from distill.losses.signal import TopKSignal
    from parallel.vocab import VocabShard

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = make_inputs(args.tokens, args.hidden, args.vocab, args.k, device, dtype)
    shard = VocabShard.of(args.vocab, 0, 1, None)
    teacher = TopKSignal(inputs["ids"], inputs["logprobs"], inputs["tail"], args.vocab)
    n = args.tokens

    def naive(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return naive_loss(
            hidden.float(), weight.float(), inputs["ids"], inputs["logprobs"], inputs["tail"], 1, 0
        )

    def ours(chunk: int | None, tf32: bool = False):
        terms = Terms(weights={"forward_kl": 1.0}, chunk_tokens=chunk, tf32=tf32)

        def loss_of(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            loss_sum, _ = fused_output_loss(
                hidden, weight, inputs["labels"], terms=terms, shard=shard, teacher=teacher
            )
            return loss_sum / n

        return loss_of, terms.chunk(shard.size, device)

    found = {"naive": measure("naive", naive, inputs, device, args.repeats)}
    chunks = [None, *(int(c) for c in args.chunks.split(",") if c)]
    for chunk in chunks:
        loss_of, size = ours(chunk)
        name = "ours" if chunk is None else f"ours_chunk{chunk}"
        found[name] = {**measure(name, loss_of, inputs, device, args.repeats), "chunk_tokens": size}
    if device.type == "cuda":  # the fp32 matmuls of ours on TF32 tensor cores (not the default): what it buys
        loss_of, size = ours(None)
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            found["ours_tf32"] = {
                **measure("ours_tf32", loss_of, inputs, device, args.repeats),
                "chunk_tokens": size,
            }
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    reference = found["naive"]
    agree = True
    for name, variant in found.items():
        variant["loss_rel_diff"] = abs(variant["loss"] - reference["loss"]) / abs(reference["loss"])
        variant["grad_hidden_rel_diff"] = rel(variant["grads"][0], reference["grads"][0])
        variant["grad_weight_rel_diff"] = rel(variant["grads"][1], reference["grads"][1])
        agree &= (
            name == "ours_tf32"
            or max(variant["loss_rel_diff"], variant["grad_hidden_rel_diff"], variant["grad_weight_rel_diff"])
            <= args.tolerance
        )
    for variant in found.values():
        del variant["grads"]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "k": args.k,
        "memory": "CUDA allocator peak above the inputs"
        if device.type == "cuda"
        else "live tensor peak (profiler)",
        "variants": found,
        "ratio_naive_over_ours_peak": reference["peak_mib"] / found["ours"]["peak_mib"],
        "ratio_ours_over_naive_time": found["ours"]["seconds"] / reference["seconds"],
        "agree": agree,
        "tolerance": args.tolerance,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
