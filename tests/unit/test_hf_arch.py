"""Models megatron-core has no mapping for: described for the HF path (`distill/models/hf_arch.py`),
routed to it by `teacher.engine: auto`, refused by megatron paths with the way out, and a model neither
path can load refused with its model_type."""

from __future__ import annotations

import json

import pytest

from distill.config import load_config
from distill.engine import teacher_engine
from distill.errors import DataError
from distill.models.weights import find_weights
from tests.helpers import tiny_hf_only, write_config


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, tokenizer_dir):
    return tiny_hf_only(tmp_path_factory.mktemp("gemma3") / "hf", tokenizer_dir, "gemma3", 640, seed=5)


def test_a_gemma3_model_is_described_for_the_hf_path(gemma3):
    import transformers

    weights = find_weights(gemma3)
    assert not weights.megatron_ready and weights.arch.model_type == "gemma3_text"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gemma3))
    assert weights.arch.num_parameters() == sum(p.numel() for p in model.parameters())  # tied: counted once
    assert (weights.arch.vocab_size, weights.arch.hidden_size, weights.arch.num_layers) == (640, 32, 4)
    assert weights.arch.tie_word_embeddings and "not supported" in weights.arch.megatron
    with pytest.raises(
        DataError, match=r"teacher.path .*'gemma3_text' has no megatron-core mapping.*teacher\.engine"
    ):
        weights.megatron_arch("teacher.path")
    with pytest.raises(DataError, match=r"student.init .*start from a llama, mistral, qwen2 or qwen3 model"):
        weights.megatron_arch("student.init")


def test_teacher_engine_auto_picks_megatron_when_it_maps_the_model(
    tmp_path, gemma3, tiny_model_dir, prepared_small
):
    tree = {**prepared_small, "teacher": {"path": str(gemma3)}, "cache": {"dir": str(tmp_path / "c")}}
    config = load_config(write_config(tmp_path / "gemma.yaml", tree))
    assert config.teacher.engine == "auto" and teacher_engine(config) == "transformers"
    tree["teacher"] = {"path": str(tiny_model_dir)}
    assert teacher_engine(load_config(write_config(tmp_path / "llama.yaml", tree))) == "megatron"
    tree["teacher"] = {"path": str(tiny_model_dir), "engine": "deepspeed"}
    assert teacher_engine(load_config(write_config(tmp_path / "zero.yaml", tree))) == "deepspeed"


def test_a_model_neither_path_loads_is_refused_with_its_type_and_the_way_out(tmp_path, gemma3):
    strange = tmp_path / "strange"
    strange.mkdir()
    (strange / "model.safetensors").write_bytes((gemma3 / "model.safetensors").read_bytes())
    config = json.loads((gemma3 / "config.json").read_text())
    (strange / "config.json").write_text(json.dumps({**config, "model_type": "retnet_xl"}))
    with pytest.raises(DataError) as err:
        find_weights(strange)
    message = str(err.value)
    assert "model_type 'retnet_xl' is neither mapped to megatron-core here" in message
    assert "nor a causal LM that transformers" in message and "pip install -U transformers" in message
