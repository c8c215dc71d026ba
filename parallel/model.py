"""megatron-core `GPTModel` for the Llama family, described by a Hugging Face config.

`ModelArch` is the architecture in the terms both sides share (hidden size, heads, key/value groups,
RoPE theta, tied embeddings, qkv bias ...), read from an HF `config.json` of type llama, mistral,
qwen2 or qwen3, or written directly for a student defined by size. `build_gpt` turns it into this rank's slice
of a megatron-core GPTModel (local layer spec: RMSNorm, SwiGLU, RoPE, grouped-query attention, and Qwen3's per-head RMSNorm
of queries and keys), with
the layers of this pipeline stage only and the vocabulary split over tensor-parallel ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from parallel.dims import ParallelDims
from parallel.errors import ParallelConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    ffn_hidden_size: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_llama3_factor: float | None = None  # Llama 3.1-style frequency scaling, if the model uses it
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3's q_norm / k_norm)
    num_experts: int = (
        0  # > 0: every layer's MLP is a mixture of this many SwiGLU experts (Mixtral, Qwen3-MoE)
    )
    moe_topk: int = 0  # experts per token
    moe_ffn_hidden_size: int = 0  # one expert's intermediate size
    moe_renormalize: bool = (
        True  # top-k probabilities renormalised to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArch:
        """Read a `config.json` dict; refuse features that the megatron-core mapping would get wrong."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ParallelConfigError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ParallelConfigError(
                f"hidden_act {config['hidden_act']!r}: only SwiGLU (silu) models are supported"
            )
        if config.get("mlp_bias") or config.get("attention_bias") and model_type != "qwen2":
            raise ParallelConfigError(
                f"attention_bias / mlp_bias on a {model_type} model are not supported (no released one has them)"
            )
        if config.get("use_sliding_window"):
            raise ParallelConfigError(
                "use_sliding_window: true is not supported (sliding-window attention is not mapped)"
            )
        moe = _moe_fields(model_type, config)
        heads = config["num_attention_heads"]
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3_factor = None
        if rope_type == "llama3":
            if any(float(rope.get(k, v)) != v for k, v in _LLAMA3_ROPE.items()):
                raise ParallelConfigError(f"llama3 RoPE scaling with parameters {rope} is not supported")
            llama3_factor = float(rope["factor"])
        elif rope_type != "default":
            raise ParallelConfigError(f"RoPE type {rope_type!r} is not supported (default or llama3 only)")
        return cls(
            model_type=model_type,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            ffn_hidden_size=config["intermediate_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            rope_theta=theta,
            rope_llama3_factor=llama3_factor,
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **moe,
        )

    def to_hf_config(self, **extra: Any) -> dict[str, Any]:
        """The `config.json` dict of an HF model with this architecture."""
        architecture = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "mixtral": "MixtralForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM",
        }
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_llama3_factor is not None:
            rope = {**rope, **_LLAMA3_ROPE, "rope_type": "llama3", "factor": self.rope_llama3_factor}
        config = {
            "architectures": [architecture[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.model_type == "llama":
            config.update(attention_bias=False, mlp_bias=False)
        if self.model_type == "qwen3":
            config.update(attention_bias=False, use_sliding_window=False)
        if self.model_type == "mixtral":
            config.update(num_local_experts=self.num_experts, num_experts_per_tok=self.moe_topk)
            config["intermediate_size"] = self.moe_ffn_hidden_size
        if self.model_type == "qwen3_moe":
            config.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.moe_topk,
                moe_intermediate_size=self.moe_ffn_hidden_size,
                norm_topk_prob=self.moe_renormalize,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                attention_bias=False,
            )
        return {**config, **extra}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelArch:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def num_parameters(self) -> int:
        attn = (
            self.hidden_size * self.head_dim * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        )
        mlp = 3 * self.hidden_size * self.ffn_hidden_size
        if self.num_experts:
            mlp = self.num_experts * (3 * self.hidden_size * self.moe_ffn_hidden_size + self.hidden_size)
        qk_norms = 2 * self.head_dim if self.qk_norm else 0
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return (
            self.num_layers * (attn + mlp + qk_norms + 2 * self.hidden_size) + embeddings + self.hidden_size
        )


def _moe_fields(model_type: str, config: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral or Qwen3-MoE config (empty for a dense model)."""
    if model_type == "mixtral":
        return {
            "num_experts": config["num_local_experts"],
            "moe_topk": config["num_experts_per_tok"],
            "moe_ffn_hidden_size": config["intermediate_size"],
            "moe_renormalize": True,
        }
    if model_type == "qwen3_moe":
        if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
            raise ParallelConfigError(
                "qwen3_moe with dense layers between the sparse ones (decoder_sparse_step != 1 or "
                "mlp_only_layers) is not supported: no released Qwen3-MoE has them"
            )
        return {
            # transformers 5 writes `num_local_experts`, released checkpoints `num_experts`
            "num_experts": config.get("num_experts") or config["num_local_experts"],
            "moe_topk": config["num_experts_per_tok"],
            "moe_ffn_hidden_size": config["moe_intermediate_size"],
            "moe_renormalize": bool(config.get("norm_topk_prob", False)),
        }
    return {}


def precision_dtype(precision: str) -> torch.dtype:
    """`auto`: bf16 where the hardware has it (CUDA with bf16), fp32 otherwise (CPU)."""
    if precision == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    return torch.bfloat16 if precision == "bf16" else torch.float32


def transformer_config(arch: ModelArch, dims: ParallelDims, dtype: torch.dtype) -> Any:
    """The megatron-core TransformerConfig of `arch` under `dims` (no dropout: distillation is deterministic)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,  # also makes finalize_model_grads sum their grads over tp
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        # initialised on the GPU where there is one (a 1B model's init on the CPU takes tens of seconds). The
        # init itself stays on although `load_weights` overwrites it: megatron-core marks tensor-parallel
        # weights (`tensor_model_parallel`, read by the grad norm) inside its init functions only
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        init_method_std=0.02,
        cuda_graph_scope=[],  # no CUDA graphs; megatron-core's default ("full") warns that it is deprecated
        **_moe_config(arch, dims),
    )


def _moe_config(arch: ModelArch, dims: ParallelDims) -> dict[str, Any]:
    """megatron-core's MoE settings for `arch`: its router (top-k, softmax after the top-k when the
    probabilities are renormalised, before it when not), SequentialMLP experts, and the all-gather token
    dispatcher (all-gather / reduce-scatter over the expert group: the one gloo runs; all-to-all needs
    NCCL). A frozen teacher: no auxiliary load-balancing loss."""
    if not arch.num_experts:
        return {}
    return {
        "num_moe_experts": arch.num_experts,
        "moe_router_topk": arch.moe_topk,
        "moe_ffn_hidden_size": arch.moe_ffn_hidden_size,
        "moe_router_pre_softmax": not arch.moe_renormalize,
        "moe_token_dispatcher_type": "allgather",
        "moe_grouped_gemm": False,
        "moe_aux_loss_coeff": 0.0,
        "moe_router_load_balancing_type": "none",
        "expert_model_parallel_size": dims.ep,
    }


def build_gpt(
    arch: ModelArch, dims: ParallelDims, *, pp_rank: int, dtype: torch.dtype = torch.float32
) -> Any:
    """This rank's GPTModel: the layers of pipeline stage `pp_rank`, vocabulary split over tp."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    dims.check_model(
        num_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        vocab_size=arch.vocab_size,
        num_experts=arch.num_experts,
    )
    if arch.num_experts:
        import megatron.core.transformer.moe.moe_utils as moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):  # 0.16.1 names it only when Transformer Engine imports
            moe_utils.te_general_gemm = None
    model = GPTModel(
        config=transformer_config(arch, dims, dtype),
        transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=arch.num_experts or None,
            moe_grouped_gemm=False,
            normalization="RMSNorm",
            qk_layernorm=arch.qk_norm,
        ),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == dims.pp - 1,
        parallel_output=True,  # logits stay [.., V/tp]: losses reduce over the tp group, never gather
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_llama3_factor is not None,
        rope_scaling_factor=arch.rope_llama3_factor or 8.0,
    )
    return model.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")


def emit_hidden_states(model: Any) -> None:
    """Make this GPTModel's last stage return its final (normed) hidden states `[b, s, h]` instead of
    logits, so a fused loss can apply the output layer chunk by chunk (`output_weight` gives the layer's
    weight). The output layer stays in the module tree, so checkpoints and DDP see it unchanged; the
    gradient all-reduce over tp that its forward would have set up is the fused loss's job."""
    if model.post_process:
        model.output_layer.forward = lambda input_, weight=None, runtime_gather_output=None, **_: (
            input_,
            None,
        )


def output_weight(model: Any) -> torch.Tensor:
    """The last stage's output-layer weight slice `[V/tp, h]` (the embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
