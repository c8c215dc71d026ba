"""What the tests share besides fixtures (those are in conftest.py): paths, real text, config trees,
a tiny HF model, the `distillery` CLI in a subprocess, a directory's bytes."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REPO = Path(__file__).resolve().parents[1]
# `student.arch` of the tiny sized students the distributed training tests start from
TINY_STUDENT_ARCH = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "ffn_hidden_size": 64,
    "max_position_embeddings": 64,
}
# a Qwen3-style student: per-head q/k norms and a head_dim that is not hidden_size / heads (8)
TINY_QWEN3_STUDENT_ARCH = {**TINY_STUDENT_ARCH, "model_type": "qwen3", "head_dim": 16}


def stdlib_texts(count: int, start: int = 0) -> list[str]:
    """Real, varied text: whole Python standard library modules, in a fixed order."""
    files = sorted(p for p in STDLIB.glob("*.py") if p.stat().st_size > 2000)
    return [f.read_text(encoding="utf-8") for f in files[start : start + count]]


def write_config(path: Path, tree: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def prepare_tree(run_dir: Path, corpus: Path, tokenizer: Path, **data: object) -> dict:
    """A minimal campaign config tree over `small_corpus`; `data` overrides keys of the data section."""
    section = {
        "tokenizer": {"path": str(tokenizer)},
        "seq_len": 64,
        "heldout_sequences": 6,
        "heldout_fraction": 0.2,
        "dir": str(run_dir / "prepared"),
        "workers": 2,
        "batch_chars": 20000,
        "checkpoint_seconds": 0,
        "domains": {
            "code": {"sources": [{"files": str(corpus / "code" / "*.jsonl")}]},
            "prose": {"sources": [{"files": str(corpus / "prose" / "*.txt")}]},
        },
    }
    section.update(data)
    return {"run": {"name": "test", "dir": str(run_dir)}, "data": section}


def few_documents(corpus: Path) -> dict:
    """The `data.domains` of a few documents of `small_corpus` (code 2, prose 3): a few hundred sequences
    at seq_len 32, for tests that cache a teacher over every sequence yet train a few steps."""
    return {
        "code": {"sources": [{"files": str(corpus / "code" / "*.jsonl"), "max_documents": 2}]},
        "prose": {"sources": [{"files": str(corpus / "prose" / "*.txt"), "max_documents": 3}]},
    }


def training_section(**overrides: object) -> dict:
    """The `training` section of the tests' tiny runs: 3 steps of 4 sequences in micro-batches of 2 at
    lr 3e-3, a metrics record every step, 2 held-out sequences per domain in each evaluation.
    `overrides` set keys (a new one goes last); a key set to None is left out (its default applies)."""
    section = {
        "steps": 3,
        "global_batch": 4,
        "micro_batch": 2,
        "lr": 3e-3,
        "log_interval": 1,
        "eval_sequences": 2,
    }
    section.update(overrides)
    return {key: value for key, value in section.items() if value is not None}


def tiny_llama(
    out: Path,
    tokenizer: Path,
    vocab_size: int,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    max_positions: int = 64,
) -> Path:
    """A tiny random HF Llama (2 layers, tied embeddings) over `tokenizer`, saved at `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.tokenizer_files import copy_tokenizer_files

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    copy_tokenizer_files(tokenizer, out)
    return out


def tiny_qwen3(out: Path, tokenizer: Path, vocab_size: int, *, seed: int = 0) -> Path:
    """A tiny random HF Qwen3 (2 layers, tied embeddings, head_dim 32 over hidden size 64) over
    `tokenizer`, saved at `out`; its q/k norm weights are perturbed from their init of 1, so a model
    that dropped them would compute something else."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from distill.tokenizer_files import copy_tokenizer_files

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    model.save_pretrained(out)
    copy_tokenizer_files(tokenizer, out)
    return out


def tiny_moe(out: Path, tokenizer: Path, kind: str, vocab_size: int, *, seed: int = 0) -> Path:
    """A tiny random mixture-of-experts model over `tokenizer`, saved at `out`: `mixtral` (4 experts,
    top-2, probabilities renormalised) or `qwen3_moe` (4 experts of 24, top-2, q/k norms perturbed,
    `norm_topk_prob` false: softmax before the top-k, not renormalised)."""
    import torch
    import transformers

    from distill.tokenizer_files import copy_tokenizer_files

    torch.manual_seed(seed)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "num_experts_per_tok": 2,
    }
    if kind == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4)
    else:
        config = transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=4,
            head_dim=16,
            norm_topk_prob=False,
        )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    model.save_pretrained(out)
    copy_tokenizer_files(tokenizer, out)
    return out


def tiny_hf_only(out: Path, tokenizer: Path, kind: str, vocab_size: int, *, seed: int = 0) -> Path:
    """A tiny random HF model of an architecture megatron-core has no mapping for here, over `tokenizer`
    (its ids a subset of `vocab_size`), saved at `out`. `gemma3`: embeddings scaled by sqrt(h), norms
    before and after each block, q/k norms, 3 sliding-window layers (window 8) and a global one;
    `olmo2`: norms after each block and over whole q/k projections; `granite`: logits divided by a
    scale after the output layer (what the HF path must refuse). Norm weights are perturbed from their
    init, so a model that skipped one would compute something else."""
    import torch
    import transformers

    from distill.tokenizer_files import copy_tokenizer_files

    torch.manual_seed(seed)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4 if kind == "gemma3" else 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    if kind == "gemma3":
        config = transformers.Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            tie_word_embeddings=True,
        )
        model = transformers.Gemma3ForCausalLM(config)
    elif kind == "olmo2":
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common, tie_word_embeddings=False))
    elif kind == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=8.0))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(out)
    copy_tokenizer_files(tokenizer, out)
    return out


def distillery(
    *args: str | Path, cwd: Path = REPO, timeout: float | None = 600, **kwargs: object
) -> subprocess.CompletedProcess:
    """`distillery ARGS...` (`python -m launcher`) in a subprocess, its stdout and stderr captured as
    text; `kwargs` go to `subprocess.run` (`env=...`). timeout=None waits for as long as it takes."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def tree_bytes(
    root: Path, *, skip: tuple[str, ...] = (), directories: bool = False
) -> dict[str, bytes | None]:
    """Every file below `root`, dotfiles included, as its bytes by path relative to `root`; with
    `directories`, every other path too (a directory) as None. Paths whose name is in `skip` are left out."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        if path.name in skip:
            continue
        if path.is_file():
            found[str(path.relative_to(root))] = path.read_bytes()
        elif directories:
            found[str(path.relative_to(root))] = None
    return found
