"""Any Hugging Face causal LM, described as far as distillery needs when `transformers` runs it.

The megatron-core mapping (`parallel.model.ModelArch`) covers llama, mistral, qwen2 and qwen3 and
refuses what it would get wrong. Every other causal LM that `transformers` knows (Gemma 3 with its
scaled embeddings, sandwich norms and sliding-window layers, OLMo 2, Phi 3, DeepSeek, ...) can still be a
teacher: the HF path (`distill/engine/hf/`) runs the module itself, sharded by transformers' tensor
parallelism or DeepSpeed ZeRO-3. What the rest of the system reads of a model (vocabulary, size, depth
and width for MFU, a JSON record for manifests and model cards) is `HFArch`, with the megatron mapping's
refusal kept as `megatron` so a megatron path can say why it cannot take the model.

A model neither path can load (a `model_type` this transformers release does not know as a causal LM)
is refused here, by `describe`, with the way out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from distill.errors import DataError
from parallel.model import SUPPORTED_MODEL_TYPES


@dataclass(frozen=True)
class HFArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    tie_word_embeddings: bool
    parameters: int  # counted from the safetensors headers: exact for any architecture
    megatron: str  # why the megatron-core mapping refuses it

    def num_parameters(self) -> int:
        return self.parameters

    def to_json(self) -> dict[str, Any]:
        return {"hf_module": True, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HFArch:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def causal_lm_types() -> set[str]:
    """The model types `AutoModelForCausalLM` builds in this transformers release."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def unloadable_message(directory: Path, model_type: Any, megatron: str) -> str:
    import transformers

    return (
        f"{directory}: model_type {model_type!r} is neither mapped to megatron-core here "
        f"({', '.join(SUPPORTED_MODEL_TYPES)}: {megatron}) nor a causal LM that transformers "
        f"{transformers.__version__} knows (AutoModelForCausalLM). The way out: install a transformers "
        f"release that has {model_type!r} (pip install -U transformers), or convert the model to one of "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def describe(directory: Path, config: dict[str, Any], megatron: str) -> HFArch:
    """The HF-module description of the model at `directory` (`config`: its config.json), whose megatron
    mapping refused it with `megatron`; an error naming its model_type when transformers cannot load it."""
    model_type = config.get("model_type")
    if model_type not in causal_lm_types():
        raise DataError(unloadable_message(directory, model_type, megatron))
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(str(directory), local_files_only=True).get_text_config()
    return HFArch(
        model_type=str(model_type),
        vocab_size=int(text.vocab_size),
        hidden_size=int(text.hidden_size),
        num_layers=int(text.num_hidden_layers),
        tie_word_embeddings=bool(
            getattr(text, "tie_word_embeddings", config.get("tie_word_embeddings", False))
        ),
        parameters=_stored_parameters(directory),
        megatron=megatron,
    )


def _stored_parameters(directory: Path) -> int:
    """Elements of every tensor in the directory's safetensors files (headers only)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                count = 1
                for size in f.get_slice(name).get_shape():
                    count *= size
                total += count
    return total
