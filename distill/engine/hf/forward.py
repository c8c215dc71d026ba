"""Forward-only passes of a Hugging Face causal LM run as a module: any architecture `transformers` knows.

The seam hands a loss rank the final hidden states `[b, s, h]` and its slice of the output weight
`[V/tp, h]`; consumers apply the output layer themselves, chunk by chunk. An HF module is asked for the
same two things without computing logits: the whole model runs (so every wrapper transformers put
around it, tensor-parallel hooks or FSDP's root, sees an ordinary forward) with `logits_to_keep` set to
no position and `output_hidden_states`, whose last entry is the final normed hidden state. Under
transformers' tensor parallelism the output layer is colwise: its weight is a DTensor sharded by rows
over the "tp" mesh dimension, and this rank's rows are a contiguous slice of the vocabulary, so the
vocabulary-parallel reductions (`parallel.vocab`, `distill/cache/extract.py`) work on it unchanged.

A model whose logits are not `hidden @ weight.T` (a final soft-cap, a logit scale) would give a wrong
signal silently; `check_output_layer` compares the two on a probe when the model is built and refuses it
with its model_type.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from distill.engine.base import OutputFn
from distill.errors import DataError
from distill.models.hf_arch import HFArch
from parallel.model import ModelArch
from parallel.vocab import VocabShard


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Whether a model class's forward accepts `logits_to_keep` (asked once per class, not per pass)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def final_hidden(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states `[b, s, h]` of an HF causal LM over `inputs` `[b, s]`."""
    keep = {}
    if _takes_logits_to_keep(type(model)):
        # keep no position: no `[b, s, V]` logits are computed
        keep = {"logits_to_keep": torch.empty(0, dtype=torch.long, device=inputs.device)}
    out = model(input_ids=inputs, output_hidden_states=True, use_cache=False, **keep)
    return out.hidden_states[-1]


def output_weight_shard(model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """This rank's rows of the output layer's weight `[V/tp, h]` and the group holding the other rows
    (None when one process holds them all)."""
    weight = model.get_output_embeddings().weight
    if not hasattr(weight, "to_local"):  # a plain tensor: the whole vocabulary
        return weight.detach(), None
    mesh = weight.device_mesh
    names = mesh.mesh_dim_names or ()
    if "tp" not in names or mesh["tp"].size() == 1:
        return weight.to_local().detach(), None
    return weight.to_local().detach(), mesh.get_group("tp")


def vocab_shard(rows: int, group: Any, vocab_size: int, device: torch.device) -> VocabShard:
    """The slice of the vocabulary `rows` local rows are, given slices follow the rank order of `group`
    (Shard(0) of a DTensor); checked to cover the vocabulary exactly."""
    if group is None:
        if rows != vocab_size:
            raise DataError(f"the output layer has {rows} rows for a vocabulary of {vocab_size}")
        return VocabShard(0, rows, None)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([rows], dtype=torch.int64, device=device), group=group)
    counts = [int(s.item()) for s in sizes]
    if sum(counts) != vocab_size:
        raise DataError(f"the output layer's shards hold {sum(counts)} rows for a vocabulary of {vocab_size}")
    rank = dist.get_rank(group)
    return VocabShard(sum(counts[:rank]), rows, group)


def check_output_layer(
    model: torch.nn.Module, weight: torch.Tensor, shard: VocabShard, model_type: str, device: torch.device
) -> None:
    """Collective over the model's ranks: refuse a model whose logits are not hidden @ weight.T."""
    config = model.config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        raise DataError(
            f"model_type {model_type!r} soft-caps its logits (final_logit_softcapping {cap}); distillery "
            "computes the teacher signal from the final hidden states and the output weight, without the cap"
        )
    vocab = config.vocab_size
    probe = (torch.arange(16, device=device) * 7919 % vocab).unsqueeze(0)  # [1, 16], the same on every rank
    with torch.no_grad():
        logits = model(input_ids=probe, use_cache=False).logits[..., shard.start : shard.start + shard.size]
        ours = torch.matmul(final_hidden(model, probe), weight.t())
    gap = (ours.float() - logits.float()).abs().max().item()
    scale = logits.float().abs().max().item()
    tolerance = 1e-4 + (1e-3 if weight.dtype == torch.float32 else 2e-2) * scale
    if gap > tolerance:
        raise DataError(
            f"model_type {model_type!r}: its logits are not its final hidden states times its output weight "
            f"(they differ by {gap:.3g} on a probe: a scale or cap after the output layer?); distillery "
            "computes the teacher signal from those two, so this model cannot be a teacher here"
        )


class HFForward:
    """Forward-only passes of an HF causal LM (whole on this rank, or tensor-parallel by transformers)."""

    def __init__(
        self, model: torch.nn.Module, arch: ModelArch | HFArch, device: torch.device, *, check: bool = True
    ) -> None:
        self.model, self.arch, self.device = model.eval(), arch, device
        self.num_parameters, self.vocab_size = arch.num_parameters(), arch.vocab_size
        self.weight, group = output_weight_shard(model)  # [V/tp, h]
        self.shard = vocab_shard(self.weight.shape[0], group, arch.vocab_size, device)
        if check:
            check_output_layer(model, self.weight, self.shard, arch.model_type, device)

    def forward(self, micro_batches: Sequence[torch.Tensor], fn: OutputFn) -> list[Any]:
        results = []
        with torch.no_grad():
            for index, tokens in enumerate(micro_batches):
                tokens = tokens.to(self.device)
                hidden = final_hidden(self.model, tokens[:, :-1])  # [b, s, h]
                results.append(fn(index, hidden, self.weight, tokens[:, 1:]))
        return results
