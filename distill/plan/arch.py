"""The architectures a plan is computed for, and where each came from.

In order: the model's own `config.json` when it can be read without a download (a local directory or
checkpoint, or a hub id already in the local Hugging Face cache); a sized student (`student.arch`, with
the tokenizer's vocabulary when it is readable, else the table's); else a small table of well-known
models by hub name. The plan prints which, so a number from the table is never mistaken for a measured
one. A model in none of them is an error naming the key and the ways out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.config import CampaignConfig
from distill.config.hub_id import HubModel
from distill.errors import DataError
from parallel.model import ModelArch


def _llama(vocab: int, hidden: int, layers: int, heads: int, kv: int, ffn: int, tied: bool) -> ModelArch:
    return ModelArch(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        ffn_hidden_size=ffn,
        head_dim=hidden // heads,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=tied,
    )


def _qwen3(hidden: int, layers: int, heads: int, ffn: int, tied: bool) -> ModelArch:
    return ModelArch(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        ffn_hidden_size=ffn,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
        qk_norm=True,
    )


# the published config.json sizes of models campaigns often name (hub name, without the organisation)
WELL_KNOWN = {
    "Llama-3.2-1B": _llama(128256, 2048, 16, 32, 8, 8192, True),
    "Llama-3.2-3B": _llama(128256, 3072, 28, 24, 8, 8192, True),
    "Llama-3.1-8B": _llama(128256, 4096, 32, 32, 8, 14336, False),
    "Llama-3.1-70B": _llama(128256, 8192, 80, 64, 8, 28672, False),
    "Qwen3-0.6B": _qwen3(1024, 28, 16, 3072, True),
    "Qwen3-1.7B": _qwen3(2048, 28, 16, 6144, True),
    "Qwen3-4B": _qwen3(2560, 36, 32, 9728, True),
    "Qwen3-8B": _qwen3(4096, 36, 32, 12288, False),
    "Qwen3-14B": _qwen3(5120, 40, 40, 17408, False),
}


@dataclass(frozen=True)
class PlannedArch:
    arch: ModelArch
    source: str  # where the sizes came from, as the plan prints it


def _config_json(location: Path | HubModel) -> Path | None:
    """A readable config.json of `location`, never downloading."""
    if isinstance(location, HubModel):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(location.repo_id, "config.json", revision=location.revision)
        return Path(found) if isinstance(found, str) else None
    return Path(location) / "config.json" if (Path(location) / "config.json").is_file() else None


def model_arch(location: Path | HubModel, key: str) -> PlannedArch:
    """The architecture of the model at `location` (config key `key`)."""
    config = _config_json(location)
    if config is not None:
        from distill.atomic import read_json
        from parallel.errors import ParallelConfigError

        found = read_json(config)
        try:
            return PlannedArch(ModelArch.from_hf_config(found), f"{config}")
        except ParallelConfigError:  # a model only the Hugging Face path runs (Gemma 3, OLMo 2, ...)
            return PlannedArch(
                _dense_decoder(found, key),
                f"{config} (model_type {found.get('model_type')!r} sized as a dense decoder: its own extras, "
                "such as sliding windows, not modeled)",
            )
    if not isinstance(location, HubModel):
        from distill.models.weights import find_weights

        try:  # a distillery checkpoint records its architecture
            return PlannedArch(find_weights(location).arch, f"checkpoint {location}")  # type: ignore[arg-type]
        except Exception:
            pass
    name = location.repo_id.split("/")[-1] if isinstance(location, HubModel) else Path(location).name
    if name in WELL_KNOWN:
        return PlannedArch(
            WELL_KNOWN[name], f"table of well-known models ({name}; not read from its config.json)"
        )
    raise DataError(
        f"{key} {location}: no config.json to read (not local, not in the Hugging Face cache) and not in the "
        f"table of well-known models ({', '.join(WELL_KNOWN)}); download its config.json "
        "(huggingface-cli download REPO config.json) or plan with a local copy"
    )


def _dense_decoder(found: dict, key: str) -> ModelArch:
    """The sizes of any decoder-only config.json, by the common Hugging Face key names."""
    text = found.get("text_config") or found  # multimodal wrappers keep the language model's sizes there
    try:
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        return ModelArch(
            model_type=str(found.get("model_type")),
            vocab_size=int(text["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(text["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            ffn_hidden_size=int(text["intermediate_size"]),
            head_dim=int(text.get("head_dim") or hidden // heads),
            max_position_embeddings=int(text.get("max_position_embeddings") or 0),
            tie_word_embeddings=bool(
                found.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{key}: its config.json lacks a size the plan needs ({exc})") from None


def student_arch(config: CampaignConfig) -> PlannedArch:
    """The student's architecture: its init model's, or `student.arch` sized over the tokenizer's vocabulary."""
    assert config.student is not None
    if config.student.init is not None:
        return model_arch(config.student.init, "student.init")
    from distill.models.student import configured_arch

    try:
        return PlannedArch(configured_arch(config), "student.arch")
    except (DataError, OSError):  # no tokenizer yet: the campaign trains it
        train = config.data.tokenizer.train
        if train is None:
            raise
        return PlannedArch(
            configured_arch(config, train.vocab_size),
            "student.arch (the vocabulary of the tokenizer to train)",
        )
