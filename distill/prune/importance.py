"""Minitron's activation-based importance, measured on the teacher under its own tp x pp layout.

Forward passes only, over calibration sequences of the prepared training data. Hooks on this rank's
megatron-core layers record, per calibration sequence, an aggregate of the activations each prunable
unit produces:

- attention head i (query head, global index): `||Attn_i(X)||_2` over its head_dim channels, at the input
  of the output projection (`linear_proj`, `[s, b, heads/tp * head_dim]`);
- MLP neuron j: `|silu(X W_gate_j) * (X W_up_j)|`, the activation the down projection reads (`linear_fc2`,
  `[s, b, ffn/tp]`): the SwiGLU product, not the gate alone;
- embedding channel c: `|RMSNorm(X)_c|` at the output of every norm (two per layer and the final one;
  `[s, b, h]`, whole on every tp rank).

Aggregation (the choice the Minitron paper found among the best): mean over the sequence, then L2 over the
calibration sequences, `sqrt(sum_b (mean_s a_{b,s})^2)`; a channel's score is the sum over the norms of
that. Sums of squares are accumulated in float64 and reduced over the whole world at the end: tp ranks hold
disjoint heads and neurons, pipeline stages disjoint layers, data-parallel replicas disjoint sequences,
and norms are counted on tp rank 0 only; so the scores are the same at any layout (what the tests check)
and no weight is ever gathered, only vectors of a few thousand numbers.

Depth: block importance `BI_l = 1 - mean cos(x_in, x_out)` of every layer (ShortGPT), and for
`depth_metric: loss` the calibration loss of the teacher with each contiguous block of the layers to drop
skipped (Minitron), plus the loss with the lowest-BI layers skipped, so both choices are measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from distill.config import CampaignConfig
from distill.data.prepared import PreparedData
from distill.engine.megatron.forward import MegatronForward
from distill.errors import DataError
from distill.losses.fused import label_logprobs
from parallel.distributed import ParallelContext


def calibration_rows(data: PreparedData, count: int) -> list[tuple[str, int]]:
    """The first `count` training sequences taken from every domain in turn (a domain that runs out is
    skipped): (domain, row) in a fixed order, the same at every layout."""
    available = {d: data.num_sequences(d, "train") for d in data.domains}
    total = sum(available.values())
    if count > total:
        raise DataError(
            f"prune.calibration_sequences is {count}, more than the {total} training sequences prepared in "
            f"{data.directory}; lower it (or prepare more data)"
        )
    rows: list[tuple[str, int]] = []
    taken = dict.fromkeys(data.domains, 0)
    while len(rows) < count:
        for domain in data.domains:
            if taken[domain] < available[domain] and len(rows) < count:
                rows.append((domain, taken[domain]))
                taken[domain] += 1
    return rows


def calibration_batches(
    data: PreparedData, count: int, micro_batch: int, dp_rank: int, dp_size: int, device: torch.device
) -> list[torch.Tensor]:
    """This replica's calibration micro-batches `[b, s + 1]` (micro-batch m goes to replica m % dp)."""
    rows = calibration_rows(data, count)
    batches = []
    for index, start in enumerate(range(0, len(rows), micro_batch)):
        if index % dp_size != dp_rank:
            continue
        chunk = rows[start : start + micro_batch]
        tokens = [
            torch.from_numpy(data.store(domain, "train").batch(np.array([row]))) for domain, row in chunk
        ]
        batches.append(torch.cat(tokens).to(device))
    return batches


class ImportanceRecorder:
    """Forward hooks on this rank's layers that accumulate the per-sequence aggregates (see module doc)."""

    def __init__(self, model: MegatronForward, ctx: ParallelContext) -> None:
        arch, module = model.arch, model.module
        layers, heads, ffn, hidden = (
            arch.num_layers,
            arch.num_attention_heads,
            arch.ffn_hidden_size,
            arch.hidden_size,
        )
        self.head_dim = arch.head_dim
        self.heads = torch.zeros(layers, heads, dtype=torch.float64)  # sum_b (mean_s ||o_i||)^2
        self.neurons = torch.zeros(layers, ffn, dtype=torch.float64)
        self.channels = torch.zeros(2 * layers + 1, hidden, dtype=torch.float64)  # per norm
        self.cosine = torch.zeros(layers, 2, dtype=torch.float64)  # sum of cos(x_in, x_out), positions
        self.sequences = torch.zeros(1, dtype=torch.float64)
        tp, tp_rank = ctx.dims.tp, ctx.tp_rank
        self.whole = tp_rank == 0  # tensors every tp rank holds whole are counted once
        local_heads, local_ffn = heads // tp, ffn // tp
        self._hooks: list[Any] = []
        for layer in module.decoder.layers:
            index = layer.layer_number - 1
            heads_at = slice(tp_rank * local_heads, (tp_rank + 1) * local_heads)
            ffn_at = slice(tp_rank * local_ffn, (tp_rank + 1) * local_ffn)
            self._pre(layer.self_attention.linear_proj, self._head_hook(index, heads_at))
            self._pre(layer.mlp.linear_fc2, self._neuron_hook(index, ffn_at))
            self._post(layer.input_layernorm, self._norm_hook(2 * index))
            self._post(layer.pre_mlp_layernorm, self._norm_hook(2 * index + 1))
            self._hooks.append(layer.register_forward_hook(self._cosine_hook(index), with_kwargs=True))
        if module.post_process:
            self._post(module.decoder.final_layernorm, self._norm_hook(2 * layers))
            self._post(module.decoder.final_layernorm, self._count_hook())

    def _pre(self, module: torch.nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        self._hooks.append(module.register_forward_pre_hook(lambda _m, args: fn(args[0])))

    def _post(self, module: torch.nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        self._hooks.append(module.register_forward_hook(lambda _m, _args, out: fn(out)))

    @staticmethod
    def _per_sequence(values: torch.Tensor) -> torch.Tensor:
        """`[s, b, n]` non-negative activations -> `[n]`: sum over sequences of (mean over positions)^2."""
        return values.float().mean(dim=0).square().sum(dim=0).double().cpu()

    def _head_hook(self, index: int, at: slice) -> Callable[[torch.Tensor], None]:
        def record(x: torch.Tensor) -> None:  # [s, b, heads/tp * head_dim]
            s, b, _ = x.shape
            norms = x.float().reshape(s, b, -1, self.head_dim).norm(dim=-1)  # [s, b, heads/tp]
            self.heads[index, at] += self._per_sequence(norms)

        return record

    def _neuron_hook(self, index: int, at: slice) -> Callable[[torch.Tensor], None]:
        def record(x: torch.Tensor) -> None:  # [s, b, ffn/tp]
            self.neurons[index, at] += self._per_sequence(x.abs())

        return record

    def _norm_hook(self, norm: int) -> Callable[[torch.Tensor], None]:
        def record(x: torch.Tensor) -> None:  # [s, b, h]
            if self.whole:
                self.channels[norm] += self._per_sequence(x.abs())

        return record

    def _count_hook(self) -> Callable[[torch.Tensor], None]:
        def record(x: torch.Tensor) -> None:  # [s, b, h]
            if self.whole:
                self.sequences += x.shape[1]

        return record

    def _cosine_hook(self, index: int) -> Callable[..., None]:
        def record(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.whole:
                return
            x_in = kwargs.get("hidden_states", args[0] if args else None)  # [s, b, h]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [s, b]
            self.cosine[index, 0] += cos.double().sum().cpu()
            self.cosine[index, 1] += cos.numel()

        return record

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def reduced(self, all_reduce_sum: Callable[[torch.Tensor], None], device: torch.device) -> dict[str, Any]:
        """The scores over every rank (collective): heads `[L, H]`, neurons `[L, F]`, channels `[h]`,
        block importance `[L]`."""
        flat = torch.cat(
            [t.flatten() for t in (self.heads, self.neurons, self.channels, self.cosine, self.sequences)]
        ).to(device)
        all_reduce_sum(flat)
        flat = flat.cpu()
        sizes = [t.numel() for t in (self.heads, self.neurons, self.channels, self.cosine, self.sequences)]
        heads, neurons, channels, cosine, sequences = torch.split(flat, sizes)
        cosine = cosine.reshape(self.cosine.shape)
        return {
            "heads": heads.reshape(self.heads.shape).sqrt().tolist(),
            "neurons": neurons.reshape(self.neurons.shape).sqrt().tolist(),
            "channels": channels.reshape(self.channels.shape).sqrt().sum(dim=0).tolist(),
            "block_importance": (1 - cosine[:, 0] / cosine[:, 1]).tolist(),
            "sequences": int(sequences.item()),
        }


@contextmanager
def layers_skipped(model: MegatronForward, skip: set[int]) -> Iterator[None]:
    """This rank's layers whose global index is in `skip` pass their input through unchanged."""
    changed = []
    for layer in model.module.decoder.layers:
        if layer.layer_number - 1 in skip:
            layer.forward = _identity_layer
            changed.append(layer)
    try:
        yield
    finally:
        for layer in changed:
            del layer.forward  # the class's forward again


def _identity_layer(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    return kwargs.get("hidden_states", args[0] if args else None), kwargs.get("context")


def calibration_loss(
    model: MegatronForward,
    batches: list[torch.Tensor],
    counting: bool,
    all_reduce_sum: Callable[[torch.Tensor], None],
    device: torch.device,
) -> float:
    """Mean next-token CE (nats) of `model` over every replica's calibration batches (collective)."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)

    def score(_index: int, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
        b, s, h = hidden.shape  # [b, s, h], weight [V/tp, h]
        logprobs = label_logprobs(hidden.reshape(b * s, h), weight, labels.reshape(-1), model.shard, 1024)
        if counting:
            totals[0] -= logprobs.double().sum()
            totals[1] += logprobs.numel()

    if batches:  # a replica with no calibration batch still joins the reduction
        with torch.no_grad():
            model.forward(batches, score)
    all_reduce_sum(totals)
    return float(totals[0] / totals[1])


def depth_losses(
    model: MegatronForward,
    batches: list[torch.Tensor],
    drop: int,
    block_importance: list[float],
    counting: bool,
    all_reduce_sum: Callable[[torch.Tensor], None],
    device: torch.device,
) -> dict[str, Any]:
    """The calibration loss of the whole teacher, with each contiguous block of `drop` layers skipped, and
    with the `drop` lowest-BI layers skipped."""

    def loss(skip: set[int]) -> float:
        with layers_skipped(model, skip):
            return calibration_loss(model, batches, counting, all_reduce_sum, device)

    layers = len(block_importance)
    lowest = sorted(sorted(range(layers), key=lambda i: block_importance[i])[:drop])
    return {
        "whole": loss(set()),
        "blocks": {
            f"{start}-{start + drop - 1}": loss(set(range(start, start + drop)))
            for start in range(layers - drop + 1)
        },
        "block_importance": {"layers": lowest, "loss": loss(set(lowest))},
    }


def measure(
    config: CampaignConfig,
    model: MegatronForward,
    ctx: ParallelContext,
    all_reduce_sum: Callable[[torch.Tensor], None],
    drop: int,
) -> dict[str, Any]:
    """Every score the pruning needs (collective over the teacher's world)."""
    assert config.prune is not None and config.teacher is not None
    data = PreparedData(config.data.dir)
    micro = config.prune.micro_batch or config.teacher.micro_batch
    batches = calibration_batches(
        data, config.prune.calibration_sequences, micro, ctx.dp_rank, ctx.dims.dp, ctx.device
    )
    recorder = ImportanceRecorder(model, ctx)
    try:
        if batches:
            with torch.no_grad():
                model.forward(batches, lambda *_: None)
    finally:
        recorder.remove()
    scores = recorder.reduced(all_reduce_sum, ctx.device)
    counting = ctx.is_last_stage and ctx.tp_rank == 0
    if drop > 0 and config.prune.method in ("depth", "both"):
        scores["depth_loss"] = depth_losses(
            model, batches, drop, scores["block_importance"], counting, all_reduce_sum, ctx.device
        )
    scores["calibration"] = {
        "sequences": config.prune.calibration_sequences,
        "tokens": config.prune.calibration_sequences * data.seq_len,
    }
    return scores
