"""Mixture-of-experts teachers on megatron-core (Mixtral, Qwen3-MoE) with expert parallelism: logits equal
`transformers`' at tp1, ep2, tp2, tp2 x ep2 and pp2 x ep2; a cache written at ep2 equals tp1's (one launch
of 4 ranks, `ranks/check_moe.py`); a campaign with a Qwen3-MoE teacher and a Llama-style student end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distill.data.prepared import PreparedData
from tests.distributed import run_ranks
from tests.distributed.test_hf_teacher import same_cache
from tests.helpers import (
    TINY_STUDENT_ARCH,
    distillery,
    prepare_tree,
    stdlib_texts,
    tiny_moe,
    training_section,
    write_config,
)


@pytest.fixture(scope="module")
def moe_work(tmp_path_factory, tokenizer_dir) -> dict[str, Any]:
    from distill.config import load_config
    from distill.data.prepare.run import prepare

    work = tmp_path_factory.mktemp("moe")
    corpus = work / "corpus"
    for domain, start in (("code", 40), ("prose", 80)):
        (corpus / domain).mkdir(parents=True)
        with open(corpus / domain / "docs.jsonl", "w", encoding="utf-8") as f:
            for text in stdlib_texts(5, start=start):
                f.write(json.dumps({"text": text[:800]}) + "\n")
    domains = {d: {"sources": [{"files": str(corpus / d / "*.jsonl")}]} for d in ("code", "prose")}
    tree = prepare_tree(
        work / "run",
        corpus,
        tokenizer_dir,
        seq_len=32,
        heldout_sequences=2,
        heldout_fraction=0.2,
        domains=domains,
    )
    prepare(load_config(write_config(work / "prepare.yaml", tree)), progress=False)
    tiny_moe(work / "mixtral", tokenizer_dir, "mixtral", 640, seed=1)
    tiny_moe(work / "qwen3_moe", tokenizer_dir, "qwen3_moe", 640, seed=2)
    tree.update(
        teacher={"path": str(work / "qwen3_moe"), "micro_batch": 4},
        cache={"dir": str(work / "cache"), "k": 16, "sequences_per_shard": 16},
    )
    write_config(work / "config.yaml", tree)
    report = run_ranks("check_moe.py", 4, tmp_path_factory.mktemp("moe_out"), str(work))[0]
    return {"work": work, "tree": tree, "report": report, "data": PreparedData(Path(tree["data"]["dir"]))}


@pytest.mark.slow
def test_moe_teacher_logits_equal_transformers_at_every_layout(moe_work):
    logits = moe_work["report"]["logits"]
    assert len(logits) == 10 and {k.split("_tp")[0] for k in logits} == {"mixtral", "qwen3_moe"}
    for name, gap in logits.items():
        assert 0.0 <= gap <= 1e-5, (name, gap)


@pytest.mark.slow
def test_a_cache_written_with_expert_parallelism_equals_tp1(moe_work):
    work, data = moe_work["work"], moe_work["data"]
    for layout in ("tp1ep2", "tp2ep2"):
        same_cache(work / "cache_tp1ep1", work / f"cache_{layout}", data, 640)
    manifest = json.loads((work / "cache_tp1ep2" / "manifest.json").read_text())
    assert manifest["teacher"]["engine"] == "megatron" and manifest["teacher"]["arch"]["num_experts"] == 4


@pytest.mark.slow
def test_a_campaign_with_a_qwen3_moe_teacher_runs_end_to_end(moe_work, tmp_path):
    tree = {**moe_work["tree"]}
    run = tmp_path / "run"
    tree.update(
        run={"name": "moe", "dir": str(run)},
        teacher={"path": str(moe_work["work"] / "qwen3_moe"), "micro_batch": 4, "parallel": {"ep": 2}},
        cache={"dir": "${run.dir}/cache", "mode": "topk", "k": 16, "sequences_per_shard": 32},
        loss={"weights": {"ce": 0.5, "forward_kl": 1.0}},
        student={"arch": TINY_STUDENT_ARCH, "init_dir": "${run.dir}/student_init"},
        training=training_section(steps=2, eval_interval=0),
        checkpoint={"dir": "${run.dir}/checkpoints", "interval": 100},
        logging={"metrics": "${run.dir}/metrics.jsonl"},
        export={"dir": "${run.dir}/student", "dtype": "float32"},
        eval={"dir": "${run.dir}/eval", "sequences": 2},
    )
    config = write_config(tmp_path / "campaign.yaml", tree)
    done = distillery("run", config, "--quiet", "--stages", "prepare,cache,train,export,eval")
    assert done.returncode == 0, done.stderr[-4000:]
    from distill.atomic import read_json

    manifest = read_json(run / "cache" / "manifest.json")
    assert manifest["teacher"]["arch"]["model_type"] == "qwen3_moe"
    evaluation = read_json(run / "eval" / "eval.json")["models"]
    assert {"teacher", "student"} <= set(evaluation)
    assert (run / "student" / "model.safetensors").is_file()
