"""The name map between Hugging Face Llama-family weights and megatron-core GPTModel parameters.

A plain map plus two layout changes:
- `linear_qkv` holds, per key/value group, `[q heads of the group; k; v]` rows; tensor parallelism gives
  each rank a contiguous range of groups, so a rank's rows come from contiguous row ranges of
  `q_proj`, `k_proj` and `v_proj` (likewise the qwen2 biases);
- `linear_fc1` is `[gate; up]` per tensor-parallel rank (SwiGLU), `linear_fc2` is `down_proj`.
Qwen3's per-head query/key norms (`q_norm`, `k_norm`, `[head_dim]`) are megatron-core's `q_layernorm` /
`k_layernorm`, whole on every tp rank.
Column-parallel weights (qkv, fc1, vocabulary) split rows across tp ranks, row-parallel weights
(proj, fc2) split columns. Layer numbers are local to a pipeline stage on the megatron side.
`hf_sources` says, for one local megatron parameter, which HF tensors and which slices of them it is
made of, so the importer reads exactly this rank's shard and nothing more.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from parallel.dims import ParallelDims
from parallel.model import ModelArch

Reader = Callable[[str, slice, slice], torch.Tensor]  # (hf name, row slice, column slice) -> tensor
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_FULL = slice(None)
_QK_NORMS = {  # megatron-core name -> HF name, within a layer
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


@dataclass(frozen=True)
class Shard:
    """Which slice of the model this rank holds."""

    arch: ModelArch
    dims: ParallelDims
    tp_rank: int
    pp_rank: int
    ep_rank: int = 0

    @property
    def layers_per_stage(self) -> int:
        return self.arch.num_layers // self.dims.pp

    def rows(self, total: int) -> slice:
        part = total // self.dims.tp
        return slice(self.tp_rank * part, (self.tp_rank + 1) * part)


def hf_sources(name: str, shard: Shard) -> Callable[[Reader], torch.Tensor]:
    """How to assemble local megatron parameter `name` of this shard from HF tensors via `read`."""
    arch = shard.arch
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        hf = (
            "model.embed_tokens.weight"
            if name.startswith("embedding") or arch.tie_word_embeddings
            else "lm_head.weight"
        )
        return lambda read: read(hf, shard.rows(arch.vocab_size), _FULL)
    if name == "decoder.final_layernorm.weight":
        return lambda read: read("model.norm.weight", _FULL, _FULL)
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"no Hugging Face source for megatron parameter {name!r}")
    layer = shard.pp_rank * shard.layers_per_stage + int(match.group(1))
    prefix, rest = f"model.layers.{layer}.", match.group(2)
    if rest == "input_layernorm.weight":
        return lambda read: read(prefix + "input_layernorm.weight", _FULL, _FULL)
    if rest == "pre_mlp_layernorm.weight":
        return lambda read: read(prefix + "post_attention_layernorm.weight", _FULL, _FULL)
    if rest in _QK_NORMS:
        return lambda read: read(prefix + _QK_NORMS[rest], _FULL, _FULL)
    if arch.num_experts and rest.startswith("mlp."):
        return _moe_source(rest, prefix, shard)
    if rest == "self_attention.linear_proj.weight":
        cols = shard.rows(arch.num_attention_heads * arch.head_dim)
        return lambda read: read(prefix + "self_attn.o_proj.weight", _FULL, cols)
    if rest == "mlp.linear_fc2.weight":
        cols = shard.rows(arch.ffn_hidden_size)
        return lambda read: read(prefix + "mlp.down_proj.weight", _FULL, cols)
    if rest == "mlp.linear_fc1.weight":
        rows = shard.rows(arch.ffn_hidden_size)
        return lambda read: torch.cat(
            [
                read(prefix + "mlp.gate_proj.weight", rows, _FULL),
                read(prefix + "mlp.up_proj.weight", rows, _FULL),
            ]
        )
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return lambda read: _qkv_shard(read, prefix + "self_attn.", kind, shard)
    raise KeyError(f"no Hugging Face source for megatron parameter {name!r}")


_MOE_NAMES = {  # model_type -> (router, expert prefix, gate, up, down) under the layer's prefix
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
}
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")


def _moe_source(rest: str, prefix: str, shard: Shard) -> Callable[[Reader], torch.Tensor]:
    """A mixture-of-experts layer: the router (whole on every rank) and this ep rank's experts, each
    split over tp like a dense MLP (expert i here is expert ep_rank x experts/ep + i of the layer)."""
    arch = shard.arch
    router, experts, gate, up, down = _MOE_NAMES[arch.model_type]
    if rest == "mlp.router.weight":
        return lambda read: read(prefix + router, _FULL, _FULL)
    match = _EXPERT.match(rest)
    if not match:
        raise KeyError(f"no Hugging Face source for megatron MoE parameter {rest!r}")
    expert = shard.ep_rank * (arch.num_experts // shard.dims.ep) + int(match.group(1))
    base = f"{prefix}{experts}.{expert}."
    part = shard.rows(arch.moe_ffn_hidden_size)
    if match.group(2) == "linear_fc2":
        return lambda read: read(f"{base}{down}.weight", _FULL, part)
    return lambda read: torch.cat(
        [read(f"{base}{gate}.weight", part, _FULL), read(f"{base}{up}.weight", part, _FULL)]
    )


def _qkv_shard(read: Reader, prefix: str, kind: str, shard: Shard) -> torch.Tensor:
    """This rank's key/value groups, each laid out as [its q heads; k; v] rows."""
    arch = shard.arch
    groups = arch.num_key_value_heads
    q_per_group = arch.num_attention_heads // groups
    local = groups // shard.dims.tp
    g0, hd = shard.tp_rank * local, arch.head_dim
    q = read(f"{prefix}q_proj.{kind}", slice(g0 * q_per_group * hd, (g0 + local) * q_per_group * hd), _FULL)
    k = read(f"{prefix}k_proj.{kind}", slice(g0 * hd, (g0 + local) * hd), _FULL)
    v = read(f"{prefix}v_proj.{kind}", slice(g0 * hd, (g0 + local) * hd), _FULL)
    tail = q.shape[1:]
    q = q.reshape(local, q_per_group * hd, *tail)
    k, v = k.reshape(local, hd, *tail), v.reshape(local, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def to_hf_state_dict(full: dict[str, torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    """Invert the map for a whole, unsharded model (tp=1, pp=1, global layer numbers)."""
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"]}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = full["output_layer.weight"]
    out["model.norm.weight"] = full["decoder.final_layernorm.weight"]
    groups, hd = arch.num_key_value_heads, arch.head_dim
    q_rows = arch.num_attention_heads // groups * hd
    for layer in range(arch.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        out[dst + "input_layernorm.weight"] = full[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = full[src + "pre_mlp_layernorm.weight"]
        out[dst + "self_attn.o_proj.weight"] = full[src + "self_attention.linear_proj.weight"]
        out[dst + "mlp.down_proj.weight"] = full[src + "mlp.linear_fc2.weight"]
        if arch.qk_norm:
            for ours, theirs in _QK_NORMS.items():
                out[dst + theirs] = full[src + ours]
        gate, up = full[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
            qkv = full[f"{src}self_attention.linear_qkv.{kind}"]
            per_group = qkv.reshape(groups, q_rows + 2 * hd, *qkv.shape[1:])
            q, k, v = per_group.split([q_rows, hd, hd], dim=1)
            tail = qkv.shape[1:]
            out[f"{dst}self_attn.q_proj.{kind}"] = q.reshape(-1, *tail)
            out[f"{dst}self_attn.k_proj.{kind}"] = k.reshape(-1, *tail)
            out[f"{dst}self_attn.v_proj.{kind}"] = v.reshape(-1, *tail)
    return {k: v.contiguous() for k, v in out.items()}
