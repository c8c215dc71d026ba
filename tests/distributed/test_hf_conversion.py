"""Hugging Face <-> megatron-core, real equivalence: the tests share one 4-process launch of
tests/distributed/ranks/check_hf_equivalence.py (tiny random llama / qwen2 / tied-llama / qwen3 models at
tp1pp1, tp2pp1, tp1pp2, tp2pp2, a checkpoint round trip and an export read back by `from_pretrained`).
The architecture mapping and the name map in one process: tests/unit/test_hf_mapping.py.
"""

from __future__ import annotations

import pytest

from tests.distributed import run_ranks

LOGITS_TOLERANCE = 1e-5
MODELS = ("llama", "qwen2", "llama_tied", "qwen3")
LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))
WORLD = 4


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks("check_hf_equivalence.py", WORLD, tmp_path_factory.mktemp("hf_equivalence"))


@pytest.mark.slow
def test_logits_match_hf_for_every_model_and_layout(reports):
    for model in MODELS:
        for tp, pp in LAYOUTS:
            key = f"{model}/tp{tp}pp{pp}"
            entries = [r["logits"][key] for r in reports if key in r["logits"]]
            # every last-stage rank (tp x dp of them) reports, nobody else does
            assert len(entries) == WORLD // pp, key
            for entry in entries:
                assert entry["shape"] == [4, 16, 256], key
                assert entry["max_abs_diff"] <= LOGITS_TOLERANCE, (key, entry)
                assert entry["ref_max_abs"] > 1.0, (key, entry)  # logits of a useful size, not ~0


@pytest.mark.slow
def test_logits_tolerance_would_catch_an_unmapped_field(reports):
    """HF's own logits move by far more than the tolerance if eps/theta/llama3 scaling were dropped."""
    sensitivity = reports[0]["sensitivity"]
    assert set(sensitivity) == set(MODELS)
    assert "no llama3 scaling" in sensitivity["llama"]
    for model, moved in sensitivity.items():
        for label, diff in moved.items():
            assert diff > 100 * LOGITS_TOLERANCE, (model, label, diff)


@pytest.mark.slow
def test_checkpoint_round_trip_gives_back_the_hf_tensors_exactly(reports):
    for r in reports:  # every rank loaded the tp2pp2 checkpoint unsharded (tp1pp1 dp4)
        assert set(r["roundtrip"]) == set(MODELS)
        for model, entry in r["roundtrip"].items():
            assert entry["arch_equal"], (r["rank"], model)
            assert entry["missing"] == [] and entry["extra"] == [], (r["rank"], model, entry)
            assert entry["unequal"] == [], (r["rank"], model, entry)
    main = reports[0]["roundtrip"]
    for model, entry in main.items():
        assert entry["unequal_to_original"] == [], (model, entry)
    # HF's state_dict() has a tied lm_head.weight that its safetensors file (and our export) leaves out
    assert main["llama_tied"]["original_extra"] == main["qwen3"]["original_extra"] == ["lm_head.weight"]
    assert main["llama"]["original_extra"] == [] and main["qwen2"]["original_extra"] == []
    assert main["qwen2"]["num_tensors"] == main["llama"]["num_tensors"] + 2 * 3  # q/k/v biases x 2 layers
    # tied (no lm_head), q_norm and k_norm x 2 layers
    assert main["qwen3"]["num_tensors"] == main["llama"]["num_tensors"] - 1 + 2 * 2


@pytest.mark.slow
def test_export_loads_with_from_pretrained_and_gives_the_same_logits(reports):
    export = reports[0]["export"]
    assert set(export) == set(MODELS)
    for model, entry in export.items():
        assert entry["class"] == entry["original_class"], (model, entry)
        assert entry["max_abs_diff"] <= LOGITS_TOLERANCE, (model, entry)
        assert entry["rms_norm_eps"] == entry["original_rms_norm_eps"], model
        assert entry["rope_parameters"] == entry["original_rope_parameters"], model
        assert entry["tie_word_embeddings"] == (model in ("llama_tied", "qwen3"))
        # no tokenizer was given: the directory is still complete for from_pretrained
        assert entry["files"] == ["config.json", "generation_config.json", "model.safetensors"]
    assert all(r["export"] == {} for r in reports[1:])
