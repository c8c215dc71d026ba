from pathlib import Path

import pytest
import torch
import yaml

from distill.config import CampaignConfig, config_to_yaml, load_config
from distill.errors import ConfigError, DataError
from tests.helpers import REPO, training_section, write_config

ALL_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def minimal(tmp_path: Path) -> dict:
    return {
        "run": {"name": "t", "dir": str(tmp_path / "run")},
        "data": {
            "tokenizer": {"path": "${run.dir}/tok"},
            "seq_len": 16,
            "dir": "${run.dir}/prepared",
            "domains": {"code": {"sources": [{"files": "corpus/*.jsonl"}]}},
        },
    }


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in ALL_CONFIGS)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    config = load_config(path)
    assert isinstance(config, CampaignConfig) and config.data.domains


def test_references_overrides_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path / "c.yaml", minimal(tmp_path))
    config = load_config(path, ["data.seq_len=128", "run.name=other"])
    assert config.data.seq_len == 128 and config.run.name == "other"
    assert config.data.tokenizer.path == tmp_path / "run" / "tok"
    assert config.data.domains["code"].sources[0].files == [str(tmp_path / "corpus" / "*.jsonl")]


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", minimal(tmp_path)))
    again = load_config(write_config(tmp_path / "resolved.yaml", yaml.safe_load(config_to_yaml(config))))
    assert again == config


def test_unknown_key_names_full_path_file_and_suggestion(tmp_path):
    tree = minimal(tmp_path)
    tree["data"]["domains"]["code"]["sources"][0]["text_feild"] = "body"
    path = write_config(tmp_path / "typo.yaml", tree)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "data.domains.code.sources[0].text_feild: unknown key" in message
    assert "did you mean 'text_field'" in message


def test_wrong_type_from_override_is_attributed(tmp_path):
    path = write_config(tmp_path / "c.yaml", minimal(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.workers: .*integer.*\(from --set\)"):
        load_config(path, ["data.workers=many"])


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda t: t["data"].update(seq_len=1), r"data\.seq_len: .*greater than or equal to 2"),
        (lambda t: t["data"].pop("seq_len"), r"data\.seq_len: required key is missing"),
        (lambda t: t["data"]["domains"].update(code={"sources": []}), r"data\.domains\.code\.sources: "),
        (
            lambda t: t["data"]["domains"]["code"]["sources"][0].update(dataset="c4"),
            r"exactly one of `files`",
        ),
        (
            lambda t: t["data"]["domains"].update({"Bad Name": t["data"]["domains"]["code"]}),
            r"domain names must match",
        ),
        (
            lambda t: t["data"].update(demo_corpus={"dir": "x", "domains": ["code", "poetry"]}),
            r"unknown demo domain",
        ),
    ],
)
def test_invalid_values_name_the_key(tmp_path, edit, pattern):
    tree = minimal(tmp_path)
    edit(tree)
    with pytest.raises(ConfigError, match=pattern):
        load_config(write_config(tmp_path / "c.yaml", tree))


def test_missing_reference_names_the_key(tmp_path):
    tree = minimal(tmp_path)
    tree["data"]["dir"] = "${run.nowhere}/prepared"
    with pytest.raises(ConfigError, match=r"data\.dir"):
        load_config(write_config(tmp_path / "c.yaml", tree))


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("run: {name: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    path = write_config(tmp_path / "c.yaml", minimal(tmp_path))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["data.seq_len"])


def training_tree(tmp_path: Path) -> dict:
    tree = minimal(tmp_path)
    tree.update(
        student={"init": str(tmp_path / "student")},
        training=training_section(steps=10, lr=1e-3, log_interval=None, eval_sequences=None),
        checkpoint={"dir": "${run.dir}/ckpt"},
        logging={"metrics": "${run.dir}/m.jsonl"},
    )
    return tree


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"loss": {"weights": {"forward_kl": 1.0}}}, "loss.weights.forward_kl need a teacher"),
        ({"teacher": {"path": "t"}}, "teacher.mode is 'cached' (the default), which needs a `cache` section"),
        ({"cache": {"dir": "c"}}, "`cache` needs a `teacher` section"),
        (
            {"teacher": {"path": "t", "mode": "online"}, "cache": {"dir": "c"}},
            "teacher.mode 'online' trains against the live teacher: remove the `cache` section",
        ),
        (
            {"teacher": {"path": "t", "mode": "online", "parallel": {"tp": 2}}},
            "teacher.parallel (tp 2, pp 1, ep 1) differs from parallel (tp 1, pp 1, ep 1)",
        ),
        (
            {"teacher": {"path": "t", "mode": "online", "parallel": {"ep": 2}}},
            "an online teacher is sharded like the student (no expert parallelism)",
        ),
        (
            {
                "teacher": {"path": "t"},
                "cache": {"dir": "c", "mode": "sampled"},
                "loss": {"weights": {"jsd": 1.0, "forward_kl": 1.0}},
            },
            "loss.weights.jsd: a sampled (RS-KD) cache holds draws",
        ),
        (
            {
                "teacher": {"path": "t"},
                "cache": {"dir": "c", "temperature": 2.0},
                "loss": {"weights": {"forward_kl": 1}},
            },
            "loss.temperature (1.0) differs from cache.temperature (2.0)",
        ),
        ({"loss": {"weights": {"ce": 0.0}}}, "loss.weights: every loss weight is 0"),
        (
            {
                "teacher": {"path": "t", "mode": "online"},
                "loss": {"weights": {"span": 1.0, "forward_kl": 1.0}},
            },
            "loss.weights.span cannot be combined with loss.weights.forward_kl",
        ),
        (
            {
                "teacher": {"path": "t"},
                "cache": {"dir": "c", "mode": "sampled"},
                "loss": {"weights": {"span": 1.0}},
            },
            "loss.weights.span need the top-k cache over the teacher's sequences",
        ),
        (
            {
                "teacher": {"path": "t", "mode": "online"},
                "loss": {"weights": {"projected_kl": 1.0}, "uld": {"alignment": "positional"}},
            },
            "loss.weights.projected_kl needs loss.uld.alignment byte_offset",
        ),
        (
            {"loss": {"taid": {"tau_start": 0.9, "tau_end": 0.5}}},
            "loss.taid: tau_start 0.9 is above tau_end 0.5",
        ),
        (
            {"loss": {"weights": {"taid": -1}}},
            "loss.weights.taid: Input should be greater than or equal to 0",
        ),
        ({"loss": {"chunk_tokens": 0}}, "loss: chunk_tokens must be positive or 'auto'"),
        (
            {
                "teacher": {"path": "t", "engine": "transformers", "parallel": {"tp": 2, "pp": 2}},
                "cache": {"dir": "c"},
            },
            "teacher.parallel.pp is 2: teacher.engine transformers shards the teacher by tensor parallelism",
        ),
        (
            {"teacher": {"path": "t", "engine": "deepspeed", "parallel": {"tp": 2}}, "cache": {"dir": "c"}},
            "teacher.parallel (tp 2, pp 1): teacher.engine deepspeed partitions the teacher by ZeRO-3",
        ),
        (
            {"teacher": {"path": "t", "mode": "online", "engine": "deepspeed"}},
            "teacher.engine 'deepspeed' chooses what runs the cache stage's teacher; an online teacher runs",
        ),
        (
            {"parallel": {"ep": 2}},
            "parallel.ep is 2: expert parallelism splits a mixture-of-experts teacher's experts",
        ),
        (
            {"teacher": {"path": "t", "engine": "deepspeed", "parallel": {"ep": 2}}, "cache": {"dir": "c"}},
            "teacher.parallel.ep is 2: expert parallelism is megatron-core's",
        ),
        (
            {"teacher": {"path": "t", "engine": "vllm"}, "cache": {"dir": "c"}},
            "teacher.engine: Input should be 'auto', 'megatron', 'transformers' or 'deepspeed'",
        ),
    ],
)
def test_loss_and_teacher_errors_name_the_keys(tmp_path, change, expected):
    tree = training_tree(tmp_path)
    tree.update(change)
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path / "c.yaml", tree))
    assert expected in str(err.value)


def test_online_teacher_and_kd_weights_validate(tmp_path):
    tree = training_tree(tmp_path)
    tree.update(
        teacher={"path": "t", "mode": "online"},
        loss={"weights": {"ce": 0.5, "reverse_kl": 1.0, "taid": 0.5}, "temperature": 2.0},
    )
    config = load_config(write_config(tmp_path / "c.yaml", tree))
    assert config.loss.weights.kd_terms() == {"reverse_kl": 1.0, "taid": 0.5}
    assert config.teacher.layout.tp == 1


@pytest.mark.parametrize(
    ("mixture", "expected"),
    [
        ({"type": "static"}, "data.mixture: type static needs `weights`"),
        ({"type": "static", "weights": {"code": -1.0}}, "weights must be >= 0 with a positive sum"),
        ({"type": "uniform", "weights": {"code": 1.0}}, "`weights` applies to type static only"),
        ({"type": "static", "weights": {"code": 1.0, "prose": 1.0}}, "missing [], unknown ['prose']"),
        ({"type": "ddk", "interval": 0}, "data.mixture.interval: Input should be greater than 0"),
        ({"type": "ddk"}, "data.mixture.type ddk needs a `teacher` section"),
    ],
)
def test_mixture_errors_name_the_keys(tmp_path, mixture, expected):
    tree = training_tree(tmp_path)
    tree["data"]["mixture"] = mixture
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path / "c.yaml", tree))
    assert expected in str(err.value)


def test_ddk_needs_heldout_sequences(tmp_path):
    tree = training_tree(tmp_path)
    tree["data"].update(mixture={"type": "ddk"}, heldout_sequences=0)
    tree["teacher"] = {"path": "t", "mode": "online"}
    with pytest.raises(ConfigError, match="ddk needs held-out sequences: data.heldout_sequences is 0"):
        load_config(write_config(tmp_path / "c.yaml", tree))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"engine": "deepspeed", "parallel": {"tp": 2}},
            "engine deepspeed shards the student by ZeRO over data parallel: parallel.tp and parallel.pp must be 1",
        ),
        ({"deepspeed": {"zero_stage": 3}}, "the `deepspeed` section is read by engine: deepspeed only"),
        (
            {"engine": "deepspeed", "deepspeed": {"zero_stage": 4}},
            "deepspeed.zero_stage: Input should be 1, 2 or 3",
        ),
        (
            {"engine": "deepspeed", "deepspeed": {"offload_param": {"device": "cpu"}}},
            "deepspeed: offload_param needs zero_stage 3",
        ),
        (
            {"engine": "deepspeed", "deepspeed": {"offload_optimizer": {"device": "nvme"}}},
            "deepspeed.offload_optimizer: device nvme needs nvme_path",
        ),
        ({"engine": "zero"}, "engine: Input should be 'megatron' or 'deepspeed'"),
        (
            {
                "engine": "deepspeed",
                "deepspeed": {"offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
            },
            "deepspeed: offload_optimizer device nvme needs zero_stage 3",
        ),
        (
            {"engine": "deepspeed", "deepspeed": {"zero_stage": 1, "overlap_comm": True}},
            "deepspeed: overlap_comm needs zero_stage 2 or 3",
        ),
    ],
)
def test_engine_errors_name_the_keys(tmp_path, change, expected):
    tree = training_tree(tmp_path)
    tree.update(change)
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path / "c.yaml", tree))
    assert expected in " ".join(str(err.value).split())


def test_the_distributed_optimizer_is_megatron_on_cuda_only(tmp_path):
    from distill.engine.megatron.distributed_optimizer import MegatronDistributedOptimizer

    tree = training_tree(tmp_path)
    tree["engine"] = "deepspeed"
    tree["training"]["distributed_optimizer"] = True
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path / "c.yaml", tree))
    assert "training.distributed_optimizer is megatron-core's optimizer (engine megatron)" in " ".join(
        str(err.value).split()
    )
    del tree["engine"]
    config = load_config(write_config(tmp_path / "c.yaml", tree))
    assert config.training.distributed_optimizer and config.loss.tf32  # TF32 loss matmuls: on by default
    with pytest.raises(ConfigError, match="DistributedOptimizer needs CUDA"):  # this machine has none
        MegatronDistributedOptimizer(None, config.training, torch.float32)


def test_deepspeed_config_maps_training_and_zero_keys(tmp_path):
    import torch

    from distill.engine.zero.config import inference_config, training_config

    tree = training_tree(tmp_path)
    tree.update(
        engine="deepspeed",
        deepspeed={"zero_stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}},
    )
    config = load_config(write_config(tmp_path / "c.yaml", tree))
    train = training_config(config, dp_size=2, dtype=torch.bfloat16)
    assert (train["train_batch_size"], train["train_micro_batch_size_per_gpu"]) == (4, 2)
    assert train["gradient_accumulation_steps"] == 1 and train["managed_gradient_accumulation"] is False
    assert train["bf16"] == {"enabled": True} and train["gradient_clipping"] == 1.0
    zero = train["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"] == {
        "device": "nvme",
        "pin_memory": False,
        "nvme_path": str(tmp_path),
    }
    assert "offload_optimizer" not in zero and zero["stage3_gather_16bit_weights_on_model_save"]
    teacher = inference_config(config, micro_batch=8, dtype=torch.float32)
    assert teacher["zero_optimization"]["stage"] == 3 and teacher["bf16"] == {"enabled": False}
    with pytest.raises(
        DataError, match="training.global_batch 4 is not a multiple of training.micro_batch 2 x 4"
    ):
        training_config(config, dp_size=4, dtype=torch.float32)
