"""Cut the teacher's Hugging Face tensors down to the kept units, consistently.

One rule per tensor (Llama / Mistral / Qwen2 / Qwen3 names): a kept query head keeps its `head_dim` rows
of `q_proj` (and bias) and columns of `o_proj`; a kept group its rows of `k_proj` / `v_proj`; a kept
neuron its rows of `gate_proj` / `up_proj` and column of `down_proj`; a kept embedding channel its
column of the embedding, of every projection that reads the residual stream and of the output layer, its
row of every projection that writes it, and its entry of every RMSNorm weight. Per-head q/k norms
(`[head_dim]`) are kept whole. Layers are renumbered in order. Nothing is rescaled: the RMSNorms then
normalise over the kept channels only, which is the pruned model Minitron distils.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distill.prune.plan import KeptUnits
from parallel.model import ModelArch

Reader = Callable[[str], torch.Tensor]  # a teacher tensor by HF name, whole


def _rows(head_indices: list[int], head_dim: int) -> torch.Tensor:
    """The rows (or columns) of the heads `head_indices` in a `[heads * head_dim, ...]` projection."""
    return torch.tensor([h * head_dim + d for h in head_indices for d in range(head_dim)], dtype=torch.long)


def cut_state_dict(read: Reader, teacher: ModelArch, kept: KeptUnits) -> dict[str, torch.Tensor]:
    """The pruned student's HF state dict (`lm_head.weight` left out when the embeddings are tied)."""
    channels = torch.tensor(kept.channels, dtype=torch.long)
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": read("model.embed_tokens.weight")[:, channels],  # [V, h']
        "model.norm.weight": read("model.norm.weight")[channels],
    }
    if not teacher.tie_word_embeddings:
        out["lm_head.weight"] = read("lm_head.weight")[:, channels]
    hd = teacher.head_dim
    for new, (old, groups, heads, neurons) in enumerate(
        zip(kept.layers, kept.groups, kept.heads, kept.neurons, strict=True)
    ):
        src, dst = f"model.layers.{old}.", f"model.layers.{new}."
        q_rows, kv_rows = _rows(heads, hd), _rows(groups, hd)
        ffn = torch.tensor(neurons, dtype=torch.long)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{dst}{norm}.weight"] = read(f"{src}{norm}.weight")[channels]
        attn = "self_attn."
        out[f"{dst}{attn}q_proj.weight"] = read(f"{src}{attn}q_proj.weight")[q_rows][:, channels]
        for name in ("k_proj", "v_proj"):
            out[f"{dst}{attn}{name}.weight"] = read(f"{src}{attn}{name}.weight")[kv_rows][:, channels]
        out[f"{dst}{attn}o_proj.weight"] = read(f"{src}{attn}o_proj.weight")[channels][:, q_rows]
        if teacher.qkv_bias:
            out[f"{dst}{attn}q_proj.bias"] = read(f"{src}{attn}q_proj.bias")[q_rows]
            for name in ("k_proj", "v_proj"):
                out[f"{dst}{attn}{name}.bias"] = read(f"{src}{attn}{name}.bias")[kv_rows]
        if teacher.qk_norm:
            for name in ("q_norm", "k_norm"):
                out[f"{dst}{attn}{name}.weight"] = read(f"{src}{attn}{name}.weight")
        for name in ("gate_proj", "up_proj"):
            out[f"{dst}mlp.{name}.weight"] = read(f"{src}mlp.{name}.weight")[ffn][:, channels]
        out[f"{dst}mlp.down_proj.weight"] = read(f"{src}mlp.down_proj.weight")[channels][:, ffn]
    return {name: tensor.contiguous() for name, tensor in out.items()}
