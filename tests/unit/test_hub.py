"""Models and tokenizers named by hub id (`hf://org/name[@revision]`), resolved offline from a local
Hugging Face cache that the test lays out itself (`HF_HOME/hub/models--org--name/{refs,snapshots}`).
The same through a whole campaign on ranks: tests/e2e/test_hub_campaign.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distill.config import load_config
from distill.errors import ConfigError
from distill.hub import HubError, HubModel, hub_record, local_dir, parse_location
from tests.helpers import distillery, prepare_tree, tiny_qwen3, write_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(hf_home: Path, tokenizer_dir: Path) -> Path:
    """`org/tiny-qwen3` at COMMIT (branch `main`), and `org/tokenizer-only` without weights, in the cache
    layout huggingface_hub reads; returns the snapshot directory of the model."""
    repo = hf_home / "hub" / "models--org--tiny-qwen3"
    snapshot = tiny_qwen3(repo / "snapshots" / COMMIT, tokenizer_dir, 640)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    bare = hf_home / "hub" / "models--org--tokenizer-only"
    (bare / "snapshots" / COMMIT).mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / "snapshots" / COMMIT / name).write_bytes((tokenizer_dir / name).read_bytes())
    (bare / "refs").mkdir()
    (bare / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, tokenizer_dir, monkeypatch) -> Path:
    from huggingface_hub import constants

    snapshot = lay_out_hub_cache(tmp_path / "hf", tokenizer_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_hub_ids_parse_and_print_back():
    assert HubModel.parse("hf://Qwen/Qwen3-8B") == HubModel("Qwen/Qwen3-8B", None)
    assert HubModel.parse("hf://Qwen/Qwen3-8B@v1.0") == HubModel("Qwen/Qwen3-8B", "v1.0")
    assert str(HubModel("Qwen/Qwen3-8B", "main")) == "hf://Qwen/Qwen3-8B@main"
    assert parse_location("Qwen/Qwen3-8B") == Path("Qwen/Qwen3-8B")  # no prefix: a path, never a download
    for bad in ("hf://", "hf://a b/c", "hf://org/name@", "hf://org/../x", "hf://a/b/c"):
        with pytest.raises(ValueError, match="is not a hub id"):
            HubModel.parse(bad)


def test_config_keys_take_hub_ids_and_name_the_key_of_a_bad_one(tmp_path, small_corpus, tokenizer_dir):
    tree = prepare_tree(tmp_path / "run", small_corpus, tokenizer_dir)
    tree["data"]["tokenizer"]["path"] = "hf://org/tiny-qwen3"
    tree["teacher"] = {"path": "hf://org/tiny-qwen3@main", "tokenizer": "hf://org/tokenizer-only"}
    tree["cache"] = {"dir": str(tmp_path / "cache"), "mode": "topk", "k": 8}
    config = load_config(write_config(tmp_path / "ok.yaml", tree))
    assert config.teacher.path == HubModel("org/tiny-qwen3", "main")
    assert config.data.tokenizer.path == HubModel("org/tiny-qwen3")
    tree["teacher"]["path"] = "hf://org/tiny qwen3"
    with pytest.raises(ConfigError, match=r"teacher\.path.*'hf://org/tiny qwen3' is not a hub id"):
        load_config(write_config(tmp_path / "bad.yaml", tree))
    tree["teacher"]["path"] = "hf://org/tiny-qwen3"
    tree["data"]["tokenizer"]["train"] = {"vocab_size": 600}
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*must be a directory, not hf://org/tiny-qwen3"):
        load_config(write_config(tmp_path / "train.yaml", tree))


def test_offline_a_cached_hub_id_resolves_by_branch_commit_or_default(offline_hub):
    for revision in (None, "main", COMMIT):
        assert local_dir(HubModel("org/tiny-qwen3", revision)) == offline_hub
    assert hub_record(HubModel("org/tiny-qwen3", "main")) == {
        "hub_id": "org/tiny-qwen3",
        "revision": "main",
        "commit": COMMIT,
    }
    assert hub_record("hf://org/tiny-qwen3") == {
        "hub_id": "org/tiny-qwen3",
        "revision": None,
        "commit": COMMIT,
    }
    assert hub_record(offline_hub) is None  # a local directory is named by its content hash instead
    # a tokenizer alone needs no weights
    assert local_dir(HubModel("org/tokenizer-only"), weights=False).name == COMMIT


def test_offline_what_the_cache_lacks_is_one_named_error(offline_hub):
    with pytest.raises(HubError) as missing:
        local_dir(HubModel("org/not-downloaded"), key="teacher.path")
    message = str(missing.value)
    assert message.startswith("teacher.path hf://org/not-downloaded: not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in message and str(offline_hub.parents[3]) in message

    with pytest.raises(HubError) as revision:
        local_dir(HubModel("org/tiny-qwen3", "v2"))
    assert str(revision.value).startswith(
        "hf://org/tiny-qwen3@v2: revision 'v2' is not in the local Hugging Face cache, which holds "
        f"main (branch or tag), {COMMIT[:12]}... (commit) of org/tiny-qwen3"
    )
    with pytest.raises(HubError, match="revision 'f{40}' is not in the local"):
        local_dir(HubModel("org/tiny-qwen3", "f" * 40))

    with pytest.raises(
        HubError, match=f"the cached snapshot {COMMIT} lacks config.json, model.safetensors; HF_HUB_OFFLINE=1"
    ):
        local_dir(HubModel("org/tokenizer-only"), key="student.init")


def test_loaders_read_hub_ids(offline_hub, tokenizer_dir):
    from distill.data.tokenizer import load_tokenizer
    from distill.models.weights import find_weights

    assert load_tokenizer(HubModel("org/tiny-qwen3")).sha256 == load_tokenizer(tokenizer_dir).sha256
    weights = find_weights(HubModel("org/tiny-qwen3", COMMIT))
    assert weights.directory == offline_hub and weights.arch.model_type == "qwen3" and weights.arch.qk_norm


def test_the_cli_names_a_hub_id_missing_offline(tmp_path, small_corpus, tokenizer_dir):
    tree = prepare_tree(tmp_path / "run", small_corpus, tokenizer_dir)
    tree["data"]["tokenizer"]["path"] = "hf://org/absent"
    config = write_config(tmp_path / "campaign.yaml", tree)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = distillery("prepare", config, env={**os.environ, **env})
    assert done.returncode == 2, done.stderr
    assert "hf://org/absent: not in the local Hugging Face cache" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "prepared").exists()
