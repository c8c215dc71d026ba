"""The student's initial weights: an HF directory (`student.init`), or a random student of the
configured size (`student.arch`) written once into `student.init_dir`.

A sized student is materialised by `transformers` with the run's seed on the main rank, so every
layout and every engine starts from bit-identical weights; an `init_dir` that already holds a student
of another architecture is refused with the differing fields named.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distill.config import CampaignConfig
from distill.config.prune import PRUNE_RECORD
from distill.data.tokenizer import load_tokenizer
from distill.errors import DataError, OutputExistsError
from distill.hub import local_dir
from distill.models.hf_io import HFCheckpoint, generation_config, write_hf_directory
from parallel.model import ModelArch


def configured_arch(config: CampaignConfig, vocab_size: int | None = None) -> ModelArch:
    """The architecture `student.arch` describes, with the tokenizer's vocabulary (or `vocab_size`) padded
    to 128."""
    arch = config.student.arch if config.student else None
    assert arch is not None
    vocab = vocab_size or load_tokenizer(config.data.tokenizer.path).vocab_size
    return ModelArch(
        model_type=arch.model_type,
        vocab_size=-(-vocab // 128) * 128,  # padded so any tp up to 128 splits it
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
        ffn_hidden_size=arch.ffn_hidden_size,
        head_dim=arch.head_dim or arch.hidden_size // arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings,
        qkv_bias=arch.model_type == "qwen2",
        qk_norm=arch.model_type == "qwen3",
    )


def student_init_path(
    config: CampaignConfig, *, is_main: bool, broadcast_from_main: Callable[[Any], Any]
) -> Path:
    """Collective: the directory the student starts from (written by the main rank if needed)."""
    student = config.student
    assert student is not None
    if student.init is not None:
        return local_dir(student.init, key="student.init")
    assert student.init_dir is not None
    problem = None
    if config.prune is not None:  # the prune stage wrote it (and checked its shape)
        if is_main and not (student.init_dir / PRUNE_RECORD).is_file():
            problem = (
                f"student.init_dir {student.init_dir} holds no pruned student: run the prune stage first "
                "(`distillery prune CONFIG`, or `distillery run`)"
            )
        problem = broadcast_from_main(problem)
        if problem:
            raise DataError(problem)
        return student.init_dir
    if is_main:
        wanted = configured_arch(config)
        if not (student.init_dir / "config.json").is_file():
            write_random_student(
                wanted,
                student.init_dir,
                tokenizer_dir=local_dir(config.data.tokenizer.path, weights=False),
                seed=config.training.seed,
            )
        elif (found := HFCheckpoint(student.init_dir).arch) != wanted:
            diff = [
                f"{k}: {v!r} there vs {wanted.to_json()[k]!r}"
                for k, v in found.to_json().items()
                if v != wanted.to_json()[k]
            ]
            problem = (
                f"student.init_dir {student.init_dir} holds a student of another architecture ({', '.join(diff)}); "
                "delete it or choose another init_dir"
            )
    problem = broadcast_from_main(problem)
    if problem:
        raise OutputExistsError(problem)
    return student.init_dir


def write_random_student(arch: ModelArch, out: Path, *, tokenizer_dir: Path, seed: int) -> None:
    """A seeded random HF model of `arch` (transformers' own init), with the campaign's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**arch.to_hf_config())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not (arch.tie_word_embeddings and k == "lm_head.weight")
    }
    write_hf_directory(
        out,
        state,
        arch,
        tokenizer_dir=tokenizer_dir,
        dtype=torch.float32,
        generation=generation_config(tokenizer_dir),
    )
