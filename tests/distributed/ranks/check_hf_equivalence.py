"""Our megatron-core GPTModel against Hugging Face, on tiny random models, in one 4-process launch.

For each model (llama untied with llama3 RoPE scaling, qwen2 with qkv biases, llama with tied
embeddings and 4 layers, qwen3 with per-head q/k norms, tied embeddings and a head_dim that is not
hidden_size / heads):
- every layout (tp, pp) in (1,1), (2,1), (1,2), (2,2): build our model, `load_into` it from the HF
  directory, run a forward-only pass over 2 micro-batches through `parallel.schedule.forward_only`, gather the full
  vocabulary on the last stage and report the max abs difference to the HF model's fp32 logits;
- at tp2 pp2: `save_checkpoint` the loaded model; then at tp1 pp1 (dp4) load it unsharded
  (`full_state_dict` -> `load_checkpoint`), invert the name map with `to_hf_state_dict` and report
  whether it equals the tensors HF stores in its safetensors file, bit for bit;
- rank 0 writes that state dict with `write_hf_directory` (float32, no tokenizer) and reports the
  logits of `AutoModelForCausalLM.from_pretrained` on the export against the original model;
- rank 0 also reports how far HF's own logits move when rms_norm_eps, rope_theta or the llama3
  scaling fall back to their defaults, so the logits tolerance is known to catch an unmapped field.

Usage (through tests.distributed.run_ranks): torchrun --nproc-per-node=4 check_hf_equivalence.py OUT_DIR
Everything runs under `__main__`: megatron's dist_checkpointing starts a spawn-context manager process,
which re-imports this file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

SEED = 1234
LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))
SEQ, MICRO_BATCH, NUM_MICRO = 16, 2, 2
COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
# name -> (transformers class, config overrides); rope_theta and rms_norm_eps are never the defaults
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaForCausalLM",
        {
            "num_hidden_layers": 2,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 16384,  # above llama3's original_max_position_embeddings
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        {
            "num_hidden_layers": 2,
            "rms_norm_eps": 3e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0},
        },
    ),
    "llama_tied": (
        "LlamaForCausalLM",
        {
            "num_hidden_layers": 4,  # pp=2 puts 2 layers on each stage
            "rms_norm_eps": 2e-6,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
        },
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        {
            "num_hidden_layers": 2,
            "head_dim": 32,  # 4 heads x 32 = 128 channels of attention over a hidden size of 64
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
}


def make_hf_model(name: str) -> Any:
    """A seeded random HF model; every tensor perturbed (norm weights != 1, biases != 0)."""
    import torch
    import transformers

    class_name, overrides = MODELS[name]
    model_cls = getattr(transformers, class_name)
    config = model_cls.config_class(**{**COMMON, **overrides})
    torch.manual_seed(SEED + len(name))
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif pname.endswith(".bias"):
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 0.1)
    return model


def hf_logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def sensitivity(model: Any, ids: Any) -> dict[str, float]:
    """How far HF's own logits move if eps / theta / llama3 scaling fell back to defaults: the
    tolerance on our logits means something only if these are far above it."""
    import copy

    rope = dict(model.config.rope_parameters)
    variants: dict[str, dict[str, Any]] = {
        "rms_norm_eps=1e-5": {"rms_norm_eps": 1e-5},
        "rope_theta=10000": {"rope_parameters": {**rope, "rope_theta": 10000.0}},
    }
    if rope["rope_type"] == "llama3":
        variants["no llama3 scaling"] = {
            "rope_parameters": {"rope_type": "default", "rope_theta": rope["rope_theta"]}
        }
    reference, moved = hf_logits(model, ids), {}
    for label, overrides in variants.items():
        config = copy.deepcopy(model.config)
        for key, value in overrides.items():
            setattr(config, key, value)
        variant = type(model)(config).eval()
        variant.load_state_dict(model.state_dict())
        moved[label] = (hf_logits(variant, ids) - reference).abs().max().item()
    return moved


def stored_tensors(hf_dir: Path) -> dict[str, Any]:
    """The tensors HF actually wrote (a tied lm_head.weight is not among them)."""
    from safetensors.torch import load_file

    return load_file(hf_dir / "model.safetensors")


def our_logits(ctx: Any, hf_dir: Path, ids: Any) -> tuple[Any, Any]:
    """Build, load and run our model at the current layout; full-vocabulary logits on the last stage."""
    import torch
    import torch.distributed as dist

    from distill.engine.megatron.weights import load_weights
    from distill.models.hf_io import HFCheckpoint
    from distill.models.weights import Weights
    from parallel.model import build_gpt
    from parallel.schedule import forward_only

    hf = HFCheckpoint(hf_dir)
    model = build_gpt(hf.arch, ctx.dims, pp_rank=ctx.pp_rank)
    load_weights(model, Weights(hf.arch, hf_dir, "hf"), ctx)
    # forward_only takes prepared sequences [b, s + 1] (inputs [:, :-1]): one padding column after ids
    tokens = torch.cat([ids, torch.zeros_like(ids[:, :1])], dim=1)
    micro_batches = [tokens[i * MICRO_BATCH : (i + 1) * MICRO_BATCH] for i in range(NUM_MICRO)]
    outputs = forward_only(
        model, micro_batches, lambda index, logits, labels: logits.detach().clone(), seq_length=SEQ
    )
    if not ctx.is_last_stage:
        return model, None
    local = torch.cat(outputs, dim=0).contiguous()  # [b, s, V/tp]
    parts = [torch.empty_like(local) for _ in range(ctx.dims.tp)]
    dist.all_gather(parts, local, group=ctx.tp_group)
    return model, torch.cat(parts, dim=-1)


def main(out_dir: Path) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from distill.checkpoint import resolve_checkpoint
    from distill.engine.megatron.checkpoint import save_checkpoint
    from distill.engine.megatron.convert import full_state_dict
    from distill.models.hf_io import HFCheckpoint, write_hf_directory
    from distill.models.hf_layout import to_hf_state_dict
    from distill.models.weights import checkpoint_meta
    from parallel.distributed import init_parallel, shutdown
    from tests.distributed import report

    work = out_dir / "work"
    hf_dirs = {name: work / "hf" / name for name in MODELS}
    ctx = init_parallel(*LAYOUTS[0], seed=SEED)
    ids = torch.randint(
        0, COMMON["vocab_size"], (NUM_MICRO * MICRO_BATCH, SEQ), generator=torch.Generator().manual_seed(SEED)
    )
    result: dict[str, Any] = {
        "rank": ctx.rank,
        "logits": {},
        "roundtrip": {},
        "export": {},
        "sensitivity": {},
    }
    originals: dict[str, Any] = {}
    if ctx.is_main:
        for name, directory in hf_dirs.items():
            originals[name] = make_hf_model(name)
            originals[name].save_pretrained(directory)
            result["sensitivity"][name] = sensitivity(originals[name], ids)
    dist.barrier()

    reference = {}
    for name, directory in hf_dirs.items():
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        reference[name] = hf_logits(hf_model, ids)
        del hf_model

    for tp, pp in LAYOUTS:
        ctx = init_parallel(tp, pp, seed=SEED)
        for name, directory in hf_dirs.items():
            model, logits = our_logits(ctx, directory, ids)
            if logits is not None:
                result["logits"][f"{name}/tp{tp}pp{pp}"] = {
                    "max_abs_diff": (logits - reference[name]).abs().max().item(),
                    "ref_max_abs": reference[name].abs().max().item(),
                    "shape": list(logits.shape),
                }
            if (tp, pp) == (2, 2):
                arch = HFCheckpoint(directory).arch
                save_checkpoint(
                    work / "ckpt" / name,
                    0,
                    model=model,
                    optimizer=None,
                    training_state={},
                    meta=checkpoint_meta(arch, str(directory)),
                    ctx=ctx,
                )
            del model

    ctx = init_parallel(1, 1, seed=SEED)  # dp4: every rank loads the whole model
    for name, directory in hf_dirs.items():
        arch = HFCheckpoint(directory).arch
        params, ckpt_arch = full_state_dict(resolve_checkpoint(work / "ckpt" / name), ctx)
        converted = to_hf_state_dict(params, ckpt_arch)
        stored = stored_tensors(directory)
        unequal = sorted(
            k for k in stored.keys() & converted.keys() if not torch.equal(stored[k], converted[k])
        )
        entry: dict[str, Any] = {
            "arch_equal": ckpt_arch == arch,
            "missing": sorted(stored.keys() - converted.keys()),
            "extra": sorted(converted.keys() - stored.keys()),
            "unequal": unequal,
            "num_tensors": len(converted),
        }
        if ctx.is_main:
            original = originals[name].state_dict()
            entry["unequal_to_original"] = sorted(
                k for k in stored if not torch.equal(original[k], converted[k])
            )
            entry["original_extra"] = sorted(original.keys() - stored.keys())  # lm_head.weight when tied
            export_dir = work / "export" / name
            write_hf_directory(
                export_dir, converted, arch, tokenizer_dir=None, dtype=torch.float32, generation={}
            )
            exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
            result["export"][name] = {
                "class": type(exported).__name__,
                "original_class": type(originals[name]).__name__,
                "max_abs_diff": (hf_logits(exported, ids) - hf_logits(originals[name], ids))
                .abs()
                .max()
                .item(),
                "rms_norm_eps": exported.config.rms_norm_eps,
                "original_rms_norm_eps": originals[name].config.rms_norm_eps,
                "rope_parameters": dict(exported.config.rope_parameters),
                "original_rope_parameters": dict(originals[name].config.rope_parameters),
                "tie_word_embeddings": exported.config.tie_word_embeddings,
                "files": sorted(p.name for p in export_dir.iterdir()),
            }
        result["roundtrip"][name] = entry
    dist.barrier()
    report(out_dir, ctx.rank, result)
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
