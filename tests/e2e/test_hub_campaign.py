"""A campaign whose every model and tokenizer is a hub id, offline (`HF_HUB_OFFLINE=1`) from a local
Hugging Face cache laid out by the test: a Qwen3 teacher cached at tp2, a Qwen3 student started from
the hub, trained and exported; the cache manifest and the model card record the commit. The resolution
rules one by one: tests/unit/test_hub.py."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import distillery, few_documents, prepare_tree, training_section, write_config
from tests.unit.test_hub import COMMIT, lay_out_hub_cache

pytestmark = pytest.mark.slow


def test_a_campaign_of_hub_ids_runs_offline_and_records_the_commit(tmp_path, small_corpus, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    hf_home = tmp_path / "hf"
    lay_out_hub_cache(hf_home, tokenizer_dir)
    run = tmp_path / "run"
    domains = few_documents(small_corpus)
    tree = prepare_tree(
        run,
        small_corpus,
        "hf://org/tiny-qwen3",
        seq_len=32,
        heldout_sequences=2,
        heldout_fraction=0.5,
        domains=domains,
    )
    tree.update(
        teacher={"path": "hf://org/tiny-qwen3@main", "micro_batch": 4, "parallel": {"tp": 2}},
        cache={"dir": "${run.dir}/cache", "mode": "topk", "k": 8, "sequences_per_shard": 32},
        loss={"weights": {"ce": 0.5, "forward_kl": 1.0}},
        student={"init": f"hf://org/tiny-qwen3@{COMMIT}"},
        training=training_section(steps=2, eval_interval=0),
        checkpoint={"dir": "${run.dir}/checkpoints", "interval": 100},
        logging={"metrics": "${run.dir}/metrics.jsonl"},
        export={"dir": "${run.dir}/student", "dtype": "float32"},
    )
    config = write_config(tmp_path / "campaign.yaml", tree)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    done = distillery("run", config, "--quiet", "--stages", "prepare,cache,train,export", env=env)
    assert done.returncode == 0, done.stderr[-4000:]

    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    assert manifest["teacher"]["path"] == "hf://org/tiny-qwen3@main"
    assert manifest["teacher"]["hub"] == {"hub_id": "org/tiny-qwen3", "revision": "main", "commit": COMMIT}
    assert manifest["teacher"]["arch"]["qk_norm"] is True
    assert "hf://org/tiny-qwen3@main" in (run / "config.yaml").read_text()  # the resolved config keeps the id

    model = AutoModelForCausalLM.from_pretrained(run / "student")
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.head_dim == 32
    card = (run / "student" / "README.md").read_text()
    assert f"distilled from `org/tiny-qwen3@main` (commit {COMMIT})" in card
    assert str(hf_home) not in card and "snapshots" not in card
