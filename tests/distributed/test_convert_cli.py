"""`distillery import` on tp x pp processes, then `distillery export`: the HF weights come back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.helpers import distillery

pytestmark = pytest.mark.slow


def test_import_at_tp2_then_export_round_trips(tmp_path, tokenizer_dir):
    from distill.tokenizer_files import copy_tokenizer_files

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=640,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=20000.0,
        tie_word_embeddings=False,
    )
    original = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in original.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    original.save_pretrained(tmp_path / "hf")
    copy_tokenizer_files(tokenizer_dir, tmp_path / "hf")

    imported = distillery(
        "launch", "--nproc", "2", "--", "import", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--tp", "2"
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000000"
    exported = distillery("export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "float32")
    assert exported.returncode == 0, exported.stderr[-3000:]

    before = load_file(tmp_path / "hf" / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (
        tmp_path / "out" / "generation_config.json"
    ).is_file()
    ids = torch.randint(0, 640, (1, 12))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=1e-6)

    again = distillery("export", str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
