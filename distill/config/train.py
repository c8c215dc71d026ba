"""Config sections of the model and training stages: student, parallel layout, optimizer, checkpoints,
metrics, export."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill.config.base import AbsPath, ModelPath, Section


class StudentArchConfig(Section):
    """A student defined by size (Llama family or Qwen3); the vocabulary comes from the campaign's tokenizer."""

    model_type: Literal["llama", "qwen2", "qwen3", "mistral"] = "llama"
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(
        default=None,
        gt=0,
        description="Channels per attention head (default hidden_size / num_attention_heads; Qwen3 sets "
        "it explicitly, e.g. 128).",
    )
    ffn_hidden_size: int = Field(gt=0)
    max_position_embeddings: int = Field(default=4096, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> StudentArchConfig:
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads} "
                "(or set head_dim)"
            )
        if self.num_attention_heads % kv:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_key_value_heads {kv}"
            )
        return self


class StudentConfig(Section):
    """Where the student starts: an HF checkpoint (`init`), or random weights of `arch` (seeded)."""

    init: ModelPath | None = Field(
        default=None,
        description="HF model directory, hub id (hf://org/name[@revision]) or distillery checkpoint to start from.",
    )
    arch: StudentArchConfig | None = None
    init_dir: AbsPath | None = Field(
        default=None,
        description="Where a randomly initialised student (from `arch`) is written as an HF directory.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if (self.init is None) == (self.arch is None):
            raise ValueError("set exactly one of `init` (a checkpoint to start from) or `arch` (random init)")
        if self.arch is not None and self.init_dir is None:
            raise ValueError(
                "`init_dir` is required with `arch` (the random initial weights are written there)"
            )
        return self


class ParallelConfig(Section):
    """Tensor and pipeline parallel degrees; data parallel is whatever the world size leaves."""

    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    ep: int = Field(
        default=1,
        ge=1,
        description="Expert parallelism of a mixture-of-experts teacher (teacher.parallel.ep, megatron-core): "
        "each MoE layer's experts split over ep ranks carved out of the data-parallel ones. Students are dense.",
    )


class TrainingConfig(Section):
    steps: int = Field(gt=0, description="Optimizer steps.")
    global_batch: int = Field(gt=0, description="Sequences per optimizer step, over all data-parallel ranks.")
    micro_batch: int = Field(gt=0, description="Sequences per forward/backward pass on one rank.")
    lr: float = Field(gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(
        default=0.2, gt=0, le=1, description="wsd: share of the steps spent decaying at the end."
    )
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 where the hardware has it (CUDA), fp32 on CPU."
    )
    seed: int = 1234
    log_interval: int = Field(default=10, gt=0)
    eval_interval: int = Field(
        default=0, ge=0, description="Held-out evaluation every this many steps (0: only at the end)."
    )
    eval_sequences: int = Field(
        default=32, ge=0, description="Held-out sequences per domain in each evaluation (0: no evaluation)."
    )
    distributed_optimizer: bool = Field(
        default=False,
        description="megatron engine on CUDA: megatron-core's DistributedOptimizer (fp32 masters and Adam "
        "state sharded over data parallel) instead of distillery's AdamW.",
    )
    peak_tflops: float | None = Field(
        default=None,
        gt=0,
        description="Peak TFLOP/s of one device for MFU (default: a table of known GPUs; none on CPU).",
    )

    @model_validator(mode="after")
    def _batch_and_schedule(self) -> TrainingConfig:
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by micro_batch {self.micro_batch}"
            )
        if self.warmup_steps >= self.steps and self.schedule != "constant":
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below steps {self.steps}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self


class CheckpointConfig(Section):
    dir: AbsPath
    interval: int = Field(default=100, gt=0, description="Save every this many steps (and at the end).")
    keep_last: int = Field(default=2, ge=1)


class WandbConfig(Section):
    project: str = "distillery"
    mode: Literal["offline", "online", "disabled"] = "offline"
    entity: str | None = None


class LoggingConfig(Section):
    metrics: AbsPath = Field(description="JSON-lines file of every logged step (always written).")
    samples: AbsPath | None = Field(
        default=None,
        description="JSON-lines file of the training sequences each step consumed (domain, index): "
        "a resumed run truncates it to its checkpoint, so it shows no sample lost or repeated.",
    )
    wandb: WandbConfig | None = None


class ExportConfig(Section):
    dir: AbsPath = Field(description="Hugging Face directory the final student is written to.")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    license: str | None = Field(
        default=None, description="The model card's license (an SPDX id such as apache-2.0)."
    )
    datasets: list[str] = Field(
        default=[], description="Hub dataset ids for the model card (besides the `dataset:` sources)."
    )
    tags: list[str] = Field(default=[], description="Extra model card tags (`distillation` is always there).")
    hub_id: str | None = Field(
        default=None,
        description="The Hub repository the export is published as (`org/name`): the model card's usage "
        "example loads it (without it, the export directory's name; never a local path).",
    )


class TeacherConfig(Section):
    """The teacher: an HF directory or hub id (`hf://org/name[@revision]`) of any causal LM transformers
    knows (Llama, Mistral, Qwen2 and Qwen3 also run under megatron-core), or a distillery checkpoint.

    `mode: cached` (default): `distillery cache` runs it once, at its own `parallel` layout, and training
    reads the cache. `mode: online`: it runs live inside the training job, sharded with the student's
    tp/pp (each pipeline stage holds its slice of both), without gradients.
    """

    path: ModelPath
    mode: Literal["cached", "online"] = "cached"
    parallel: ParallelConfig | None = Field(
        default=None,
        description="The cache job's tp/pp (default tp 1, pp 1); online teachers use the student's.",
    )
    engine: Literal["auto", "megatron", "transformers", "deepspeed"] = Field(
        default="auto",
        description="What runs the teacher in the cache stage: megatron (megatron-core at teacher.parallel tp x "
        "pp; llama, mistral, qwen2, qwen3), transformers (the HF module under transformers' tensor parallelism "
        "at teacher.parallel.tp, pp 1; any causal LM with a tp plan) or deepspeed (the HF module under "
        "ZeRO-3, tp and pp 1); auto: megatron when the model maps to it, else transformers. An online "
        "teacher runs in the student's engine.",
    )
    micro_batch: int = Field(default=8, gt=0, description="Sequences per teacher forward pass.")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    tokenizer: ModelPath | None = Field(
        default=None,
        description="The teacher's tokenizer directory or hub id (default: the one in teacher.path). When it is not the "
        "data's, prepare also stores each sequence in the teacher's tokens (for ULD).",
    )
    seq_len: int | None = Field(
        default=None,
        ge=2,
        description="Teacher tokens per paired sequence (default 2 x data.seq_len); text beyond them has no "
        "teacher position and is counted as truncated in the prepared manifest.",
    )

    @property
    def layout(self) -> ParallelConfig:
        """The layout of the cache job."""
        return self.parallel or ParallelConfig()


class CacheConfig(Section):
    """The offline teacher signal (`distillery cache`): top-k + tail, or sampled ids with counts."""

    dir: AbsPath
    mode: Literal["topk", "sampled"] = "topk"
    k: int = Field(default=64, gt=0, description="top-k: ids kept per position.")
    temperature: float = Field(
        default=1.0, gt=0, description="top-k: softmax temperature of the stored log-probs."
    )
    samples: int = Field(default=50, gt=0, le=255, description="sampled: draws per position (RS-KD).")
    seed: int = Field(default=0, description="sampled: seed of the draws (per sequence, layout-independent).")
    sequences_per_shard: int = Field(default=256, gt=0)
