"""Memory per GPU of a stage: what each rank holds, item by item, from the architectures and the layout.

The weights, gradients and optimizer state are what our engines allocate (tested against the tensors an
engine holds after one step):

- megatron engine: this rank's parameters in the training dtype (its layers / pp, the matrices / tp, the
  norms whole; the embedding on the first stage, the output layer on the last, a tied embedding on both
  when pp > 1); gradients in megatron-core's DDP buffers, fp32; AdamW moments fp32 (8 B per parameter)
  plus fp32 masters when the weights are bf16 (4 B); `training.distributed_optimizer` divides masters and
  moments by dp.
- DeepSpeed ZeRO (stage z over dp ranks): module weights (divided by dp at z = 3), fp32 gradients
  (divided at z >= 2), fp32 masters, moments (12 B per parameter, divided at z >= 1).

Activations are estimated (Korthikanti et al. 2022, no sequence parallelism, no recomputation, attention
scores materialised as megatron-core's local layer spec does): per layer and micro-batch
`s b h (10 + 24 / tp)` 2-byte elements (x2 in fp32) and `8 a s^2 b / tp` bytes of scores, the first
pipeline stage holding up to `pp` micro-batches in flight under 1F1B. The fused loss keeps two
`[chunk, V/tp]` fp32 buffers; an online teacher its weights; a forward-only job (cache, prune) one
micro-batch's hidden states and a `[1024, V/tp]` fp32 logits chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.model import ModelArch


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1


@dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    note: str = ""


def layer_parameters(arch: ModelArch, tp: int) -> int:
    """One transformer layer's parameters on one tp rank (matrices split, norms whole)."""
    attn = arch.hidden_size * arch.head_dim * (arch.num_attention_heads * 2 + arch.num_key_value_heads * 2)
    mlp = 3 * arch.hidden_size * arch.ffn_hidden_size
    if arch.num_experts:
        mlp = (
            arch.num_experts * 3 * arch.hidden_size * arch.moe_ffn_hidden_size
            + arch.num_experts * arch.hidden_size
        )
    biases = arch.head_dim * (arch.num_attention_heads + 2 * arch.num_key_value_heads) if arch.qkv_bias else 0
    norms = 2 * arch.hidden_size + (2 * arch.head_dim if arch.qk_norm else 0)
    return (attn + mlp + biases) // tp + norms


def stage_parameters(arch: ModelArch, layout: Layout, stage: int) -> int:
    """Parameters held by one rank of pipeline stage `stage`."""
    layers = arch.num_layers // layout.pp
    count = layers * layer_parameters(arch, layout.tp)
    vocab_slice = arch.vocab_size // layout.tp * arch.hidden_size
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        count += vocab_slice
    if last:
        count += arch.hidden_size  # the final norm
        if not arch.tie_word_embeddings or not first:
            count += vocab_slice  # the output layer (a tied embedding's copy on the last stage)
    return count


def rank_parameters(arch: ModelArch, layout: Layout) -> int:
    """The most parameters any rank holds (the stage that decides whether the layout fits)."""
    return max(stage_parameters(arch, layout, stage) for stage in range(layout.pp))


def dtype_bytes(bf16: bool) -> int:
    return 2 if bf16 else 4


def megatron_state(
    arch: ModelArch, layout: Layout, *, bf16: bool, distributed_optimizer: bool, stage: int | None = None
) -> list[Item]:
    """Weights, gradients and optimizer state of one megatron-engine rank (the largest stage's, or `stage`'s)."""
    params = rank_parameters(arch, layout) if stage is None else stage_parameters(arch, layout, stage)
    per_param = (4 if bf16 else 0) + 8  # fp32 masters of bf16 weights, AdamW exp_avg and exp_avg_sq
    shards = layout.dp if distributed_optimizer else 1
    return [
        Item("weights", params * dtype_bytes(bf16), f"{params:,} parameters"),
        Item("gradients", params * 4, "fp32 DDP buffers"),
        Item(
            "optimizer",
            -(-params * per_param // shards),
            ("fp32 masters + " if bf16 else "")
            + "AdamW moments"
            + (f" / dp {layout.dp}" if shards > 1 else ""),
        ),
    ]


def zero_state(arch: ModelArch, dp: int, *, bf16: bool, zero_stage: int) -> list[Item]:
    """Weights, gradients and optimizer state of one DeepSpeed ZeRO rank over `dp` ranks."""
    params = arch.num_parameters()
    weights = params * dtype_bytes(bf16) // (dp if zero_stage >= 3 else 1)
    gradients = params * 4 // (dp if zero_stage >= 2 else 1)
    optimizer = params * 12 // dp  # fp32 flat partition (masters) + AdamW moments
    return [
        Item("weights", weights, f"{params:,} parameters" + (f" / dp {dp}" if zero_stage >= 3 else "")),
        Item("gradients", gradients, "fp32" + (f" / dp {dp}" if zero_stage >= 2 else "")),
        Item("optimizer", optimizer, f"fp32 masters + AdamW moments / dp {dp}"),
    ]


# bytes kept per attention-score element by megatron-core's local (unfused) attention: the softmax's fp32
# output (`attention_softmax_in_fp32`) and the probabilities in the model's dtype, in place of the 5 B of
# Korthikanti et al.'s fp16 count. With it the plan gives 93.7 GiB for the H200 run of bench/scale.py (1.24B,
# seq 2048, micro-batch 4, bf16), whose CUDA allocator peaked at 91.6 GiB.
SCORE_BYTES = 8


def activations(
    arch: ModelArch, layout: Layout, *, seq_len: int, micro_batch: int, in_flight: int, bf16: bool
) -> Item:
    s, b, h, a, t = seq_len, micro_batch, arch.hidden_size, arch.num_attention_heads, layout.tp
    element = dtype_bytes(bf16)
    per_layer = s * b * h * (10 + 24 / t) * element / 2 + SCORE_BYTES * a * s * s * b / t
    layers = arch.num_layers // layout.pp
    total = int(per_layer * layers * in_flight)
    return Item("activations", total, f"{in_flight} micro-batch(es) of {b} x {s} in flight, estimated")


def loss_buffers(arch: ModelArch, layout: Layout, *, chunk_tokens: int, tokens: int) -> Item:
    rows = min(chunk_tokens, tokens)
    return Item(
        "fused loss buffers", 2 * rows * (arch.vocab_size // layout.tp) * 4, f"2 x [{rows}, V/tp] fp32"
    )


def forward_only(
    arch: ModelArch, layout: Layout, *, seq_len: int, micro_batch: int, bf16: bool
) -> list[Item]:
    """A frozen model run forward (cache, prune): its weights, one layer's activations of a micro-batch,
    the hidden states handed to the extraction and the logits chunk it applies the output layer in."""
    params = rank_parameters(arch, layout)
    act = activations(arch, layout, seq_len=seq_len, micro_batch=micro_batch, in_flight=1, bf16=bf16)
    one_layer = act.bytes // max(1, arch.num_layers // layout.pp)
    hidden = micro_batch * seq_len * arch.hidden_size * dtype_bytes(bf16)
    return [
        Item("weights", params * dtype_bytes(bf16), f"{params:,} parameters"),
        Item("activations", one_layer + hidden, "one layer's, and the final hidden states"),
        Item("logits chunk", 1024 * (arch.vocab_size // layout.tp) * 4, "[1024, V/tp] fp32"),
    ]
