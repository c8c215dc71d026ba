"""Hugging Face <-> megatron-core in one process: the architecture mapping (`ModelArch.from_hf_config`),
the parallel degrees' checks, and the name map with its qkv interleave. Real equivalence on gloo ranks:
tests/distributed/test_hf_conversion.py.
"""

from __future__ import annotations

import pytest
import torch

from distill.models.hf_layout import Shard, hf_sources, to_hf_state_dict
from parallel.dims import ParallelDims
from parallel.errors import ParallelConfigError
from parallel.model import ModelArch

# --- ModelArch.from_hf_config ------------------------------------------------------------------


def llama_config(**overrides: object) -> dict:
    config = {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 16384,
    }
    return {**config, **overrides}


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_from_hf_config_reads_the_fields():
    arch = ModelArch.from_hf_config(
        llama_config(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=True)
    )
    assert (arch.rope_theta, arch.rms_norm_eps, arch.tie_word_embeddings) == (5000.0, 1e-6, True)
    assert (arch.num_key_value_heads, arch.head_dim, arch.ffn_hidden_size) == (2, 16, 96)
    assert arch.rope_llama3_factor is None and not arch.qkv_bias
    assert ModelArch.from_hf_config(llama_config(model_type="qwen2")).qkv_bias
    assert ModelArch.from_hf_config(arch.to_hf_config()) == arch


def test_qwen3_maps_its_query_key_norms_and_explicit_head_dim():
    arch = ModelArch.from_hf_config(llama_config(model_type="qwen3", head_dim=32, tie_word_embeddings=True))
    assert arch.qk_norm and not arch.qkv_bias and arch.head_dim == 32  # not hidden_size / heads (16)
    assert not ModelArch.from_hf_config(llama_config()).qk_norm
    written = arch.to_hf_config()
    assert written["architectures"] == ["Qwen3ForCausalLM"] and written["use_sliding_window"] is False
    assert ModelArch.from_hf_config(written) == arch
    # per layer: q/k/v/o, gate/up/down, two norms and the two [head_dim] q/k norms; tied embeddings once
    per_layer = 64 * 32 * (4 * 2 + 2 * 2) + 3 * 64 * 96 + 2 * 64 + 2 * 32
    assert arch.num_parameters() == 2 * per_layer + 256 * 64 + 64
    shard = Shard(arch, ParallelDims(tp=2, pp=1, dp=1), tp_rank=1, pp_rank=0)
    tensors = {"model.layers.1.self_attn.q_norm.weight": torch.arange(32.0)}
    read = lambda name, rows, cols: tensors[name][rows]  # noqa: E731
    # whole on every tp rank (it normalises each head, and each rank holds whole heads)
    assert torch.equal(
        hf_sources("decoder.layers.1.self_attention.q_layernorm.weight", shard)(read), torch.arange(32.0)
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": True}, "attention_bias / mlp_bias on a qwen3 model"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window: true is not supported"),
    ],
)
def test_qwen3_features_that_are_not_mapped_are_refused(change, message):
    with pytest.raises(ParallelConfigError, match=message):
        ModelArch.from_hf_config(llama_config(model_type="qwen3", **change))


def test_llama3_rope_scaling_with_the_default_factors_is_accepted():
    arch = ModelArch.from_hf_config(llama_config(rope_parameters={**LLAMA3, "rope_theta": 500000.0}))
    assert (arch.rope_llama3_factor, arch.rope_theta) == (8.0, 500000.0)
    # the transformers 4 spelling: rope_scaling with a top-level rope_theta
    legacy = ModelArch.from_hf_config(
        llama_config(rope_scaling={**LLAMA3, "factor": 32.0}, rope_theta=250000.0)
    )
    assert (legacy.rope_llama3_factor, legacy.rope_theta) == (32.0, 250000.0)
    assert ModelArch.from_hf_config(arch.to_hf_config()) == arch


@pytest.mark.parametrize(
    "change",
    [{"low_freq_factor": 2.0}, {"high_freq_factor": 8.0}, {"original_max_position_embeddings": 4096}],
)
def test_llama3_rope_scaling_with_other_factors_is_refused(change):
    with pytest.raises(ParallelConfigError, match="llama3 RoPE scaling"):
        ModelArch.from_hf_config(llama_config(rope_parameters={**LLAMA3, "rope_theta": 5e5, **change}))


@pytest.mark.parametrize("rope_type", ["yarn", "linear", "dynamic"])
def test_other_rope_types_are_refused(rope_type):
    with pytest.raises(ParallelConfigError, match=f"RoPE type '{rope_type}' is not supported"):
        ModelArch.from_hf_config(llama_config(rope_parameters={"rope_type": rope_type, "factor": 2.0}))


def test_unsupported_model_type_is_refused_naming_the_supported_ones():
    with pytest.raises(ParallelConfigError) as error:
        ModelArch.from_hf_config(llama_config(model_type="gpt2"))
    message = str(error.value)
    assert "'gpt2'" in message
    assert all(name in message for name in ("llama", "mistral", "qwen2", "qwen3"))


def test_activation_other_than_silu_is_refused():
    with pytest.raises(ParallelConfigError, match="hidden_act 'gelu'"):
        ModelArch.from_hf_config(llama_config(hidden_act="gelu"))


# --- ParallelDims ------------------------------------------------------------------------------


def test_from_world_derives_dp():
    assert ParallelDims.from_world(8, 2, 2) == ParallelDims(tp=2, pp=2, dp=2)


def test_from_world_error_names_world_size_tp_and_pp():
    with pytest.raises(ParallelConfigError) as error:
        ParallelDims.from_world(6, 2, 2)
    message = str(error.value)
    assert "world size 6" in message and "tp x pp = 2 x 2 = 4" in message
    with pytest.raises(ParallelConfigError, match=r"parallel\.tp \(0\)"):
        ParallelDims.from_world(4, 0, 1)


def test_expert_parallelism_is_carved_out_of_data_parallelism():
    assert ParallelDims.from_world(8, 2, 1, ep=2) == ParallelDims(tp=2, pp=1, dp=4, ep=2)
    with pytest.raises(ParallelConfigError) as error:
        ParallelDims.from_world(4, 2, 1, ep=4)
    assert "ep 4 does not divide the data-parallel ranks: world size 4 / (tp 2 x pp 1) = dp 2" in str(
        error.value
    )
    with pytest.raises(ParallelConfigError) as error:
        ParallelDims(tp=1, pp=1, dp=4, ep=4).check_model(
            num_layers=2, num_attention_heads=4, num_query_groups=2, vocab_size=256, num_experts=6
        )
    assert "experts 6 % ep 4 != 0" in str(error.value)
    with pytest.raises(ParallelConfigError, match=r"ep 2 on a dense model"):
        ParallelDims(tp=1, pp=1, dp=2, ep=2).check_model(
            num_layers=2, num_attention_heads=4, num_query_groups=2, vocab_size=256
        )


def test_moe_configs_map_their_router_and_experts():
    mixtral = ModelArch.from_hf_config(
        {
            "model_type": "mixtral",
            "vocab_size": 64,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 48,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        }
    )
    assert (mixtral.num_experts, mixtral.moe_topk, mixtral.moe_ffn_hidden_size, mixtral.moe_renormalize) == (
        8,
        2,
        48,
        True,
    )
    qwen = ModelArch.from_hf_config(
        {
            "model_type": "qwen3_moe",
            "vocab_size": 64,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "head_dim": 16,
            "moe_intermediate_size": 24,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        }
    )
    assert qwen.qk_norm and (qwen.num_experts, qwen.moe_ffn_hidden_size, qwen.moe_renormalize) == (
        4,
        24,
        True,
    )
    with pytest.raises(ParallelConfigError, match="decoder_sparse_step != 1 or mlp_only_layers"):
        ModelArch.from_hf_config(
            {
                "model_type": "qwen3_moe",
                "vocab_size": 64,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 96,
                "moe_intermediate_size": 24,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "mlp_only_layers": [0],
            }
        )


def test_check_model_names_every_dimension_that_does_not_divide():
    with pytest.raises(ParallelConfigError) as error:
        ParallelDims(tp=3, pp=3, dp=1).check_model(
            num_layers=2, num_attention_heads=4, num_query_groups=2, vocab_size=256
        )
    message = str(error.value)
    assert "tp=3, pp=3" in message
    for part in (
        "attention heads 4 % tp 3",
        "key/value heads 2 % tp 3",
        "vocabulary 256 % tp 3",
        "layers 2 % pp 3",
    ):
        assert part in message

    with pytest.raises(ParallelConfigError) as error:
        ParallelDims(tp=2, pp=3, dp=1).check_model(
            num_layers=4, num_attention_heads=4, num_query_groups=2, vocab_size=256
        )
    assert "layers 4 % pp 3" in str(error.value)
    assert "heads" not in str(error.value) and "vocabulary" not in str(error.value)
    ParallelDims(tp=2, pp=2, dp=1).check_model(
        num_layers=4, num_attention_heads=4, num_query_groups=2, vocab_size=256
    )


# --- the qkv interleave ------------------------------------------------------------------------

TINY = ModelArch(
    model_type="qwen2",
    vocab_size=8,
    hidden_size=8,
    num_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    ffn_hidden_size=6,
    head_dim=2,
    max_position_embeddings=16,
    qkv_bias=True,
)


def numbered(*shape: int, start: int) -> torch.Tensor:
    """Distinct values everywhere, so any misplaced row shows."""
    count = 1
    for size in shape:
        count *= size
    return torch.arange(start, start + count, dtype=torch.float32).reshape(shape)


def test_to_hf_state_dict_inverts_the_qkv_interleave():
    # 4 query heads in 2 groups, head_dim 2: group g is [q heads 2g, 2g+1; k head g; v head g]
    q, k, v = numbered(8, 8, start=0), numbered(4, 8, start=1000), numbered(4, 8, start=2000)
    qb, kb, vb = numbered(8, start=3000), numbered(4, start=4000), numbered(4, start=5000)
    qkv = torch.cat([q[0:4], k[0:2], v[0:2], q[4:8], k[2:4], v[2:4]])
    qkv_bias = torch.cat([qb[0:4], kb[0:2], vb[0:2], qb[4:8], kb[2:4], vb[2:4]])
    gate, up = numbered(6, 8, start=6000), numbered(6, 8, start=7000)
    full = {
        "embedding.word_embeddings.weight": numbered(8, 8, start=8000),
        "output_layer.weight": numbered(8, 8, start=9000),
        "decoder.final_layernorm.weight": numbered(8, start=10000),
        "decoder.layers.0.input_layernorm.weight": numbered(8, start=11000),
        "decoder.layers.0.pre_mlp_layernorm.weight": numbered(8, start=12000),
        "decoder.layers.0.self_attention.linear_qkv.weight": qkv,
        "decoder.layers.0.self_attention.linear_qkv.bias": qkv_bias,
        "decoder.layers.0.self_attention.linear_proj.weight": numbered(8, 8, start=13000),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.cat([gate, up]),
        "decoder.layers.0.mlp.linear_fc2.weight": numbered(8, 6, start=14000),
    }
    hf = to_hf_state_dict(full, TINY)
    attn = "model.layers.0.self_attn."
    for name, expected in {"q_proj": q, "k_proj": k, "v_proj": v}.items():
        assert torch.equal(hf[f"{attn}{name}.weight"], expected), name
    for name, expected in {"q_proj": qb, "k_proj": kb, "v_proj": vb}.items():
        assert torch.equal(hf[f"{attn}{name}.bias"], expected), name
    assert torch.equal(hf["model.layers.0.mlp.gate_proj.weight"], gate)
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], up)
    assert torch.equal(hf["lm_head.weight"], full["output_layer.weight"])
    assert torch.equal(
        hf["model.layers.0.post_attention_layernorm.weight"],
        full["decoder.layers.0.pre_mlp_layernorm.weight"],
    )
    layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"]
    layer += ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    layer += [f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")]
    expected_names = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    assert set(hf) == expected_names | {f"model.layers.0.{name}" for name in layer}

    # and the importer's direction rebuilds the interleave, whole at tp1 and one group per rank at tp2
    def read(name: str, rows: slice, cols: slice) -> torch.Tensor:
        return hf[name][rows] if hf[name].dim() == 1 else hf[name][rows, cols]

    name = "decoder.layers.0.self_attention.linear_qkv."
    for kind, whole in (("weight", qkv), ("bias", qkv_bias)):
        shard = Shard(TINY, ParallelDims(tp=1, pp=1, dp=1), tp_rank=0, pp_rank=0)
        assert torch.equal(hf_sources(name + kind, shard)(read), whole)
        halves = [
            hf_sources(name + kind, Shard(TINY, ParallelDims(tp=2, pp=1, dp=1), tp_rank=r, pp_rank=0))(read)
            for r in range(2)
        ]
        assert torch.equal(torch.cat(halves), whole)

    tied = to_hf_state_dict(full, ModelArch(**{**TINY.to_json(), "tie_word_embeddings": True}))
    assert set(tied) == set(hf) - {"lm_head.weight"}
