"""Minitron's plan: the pruned architecture and its refusals, the units kept from given scores, the
`prune` / `correct` config sections, and the stage's refusals of bad data (calibration, tokenizer)."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from distill.config import CampaignConfig, config_to_yaml, load_config
from distill.errors import ConfigError, DataError
from distill.prune.plan import choose_units, pruned_arch
from parallel.model import ModelArch
from tests.helpers import write_config
from tests.unit.test_config import training_tree

TEACHER = ModelArch(  # the demo teacher's shape
    model_type="llama",
    vocab_size=8192,
    hidden_size=192,
    num_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    ffn_hidden_size=512,
    head_dim=32,
    max_position_embeddings=1024,
    rope_theta=50000.0,
    tie_word_embeddings=True,
)
WIDTH = {
    "hidden_size": 96,
    "num_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "ffn_hidden_size": 256,
}


def pruning(tmp_path: Path, arch: dict, method: str = "width", **extra: object) -> CampaignConfig:
    tree = training_tree(tmp_path)
    tree.update(
        student={"arch": arch, "init_dir": str(tmp_path / "init")},
        teacher={"path": str(tmp_path / "teacher")},
        cache={"dir": str(tmp_path / "cache")},
        prune={"method": method, "dir": str(tmp_path / "prune")},
        **extra,
    )
    return load_config(write_config(tmp_path / "c.yaml", tree))


def test_the_target_takes_its_sizes_from_student_arch_and_the_rest_from_the_teacher(tmp_path):
    unstated = {k: v for k, v in WIDTH.items() if k != "head_dim"}  # whole heads: the teacher's head_dim
    assert pruned_arch(pruning(tmp_path, unstated), TEACHER) == pruned_arch(pruning(tmp_path, WIDTH), TEACHER)
    arch = pruned_arch(pruning(tmp_path, WIDTH), TEACHER)
    assert (arch.hidden_size, arch.num_layers, arch.num_attention_heads, arch.num_key_value_heads) == (
        96,
        4,
        4,
        2,
    )
    assert (arch.ffn_hidden_size, arch.head_dim, arch.vocab_size, arch.rope_theta) == (256, 32, 8192, 50000.0)
    assert arch.tie_word_embeddings and arch.model_type == "llama"


@pytest.mark.parametrize(
    ("arch", "method", "parallel", "expected"),
    [
        (
            {**WIDTH, "hidden_size": 256, "ffn_hidden_size": 1024},
            "width",
            {},
            "larger than the teacher: student.arch.hidden_size 256 > the teacher's 192; "
            "student.arch.ffn_hidden_size 1024 > the teacher's 512",
        ),
        ({**WIDTH, "head_dim": 24}, "width", {}, "student.arch.head_dim is 24, the teacher's is 32"),
        ({**WIDTH, "num_layers": 2}, "width", {}, "prune.method width keeps every layer"),
        (
            {**WIDTH, "num_layers": 2},
            "depth",
            {},
            "prune.method depth drops whole layers and keeps the width",
        ),
        (
            {**WIDTH, "num_attention_heads": 4, "num_key_value_heads": 1},
            "width",
            {},
            "student.arch has 4 query heads per key/value head (4 / 1), the teacher 3",
        ),
        (
            {**WIDTH, "num_attention_heads": 3, "num_key_value_heads": 1},
            "width",
            {"tp": 2},
            "does not split over the student's layout: attention heads 3 % parallel.tp 2 != 0; "
            "key/value heads 1 % parallel.tp 2 != 0",
        ),
        (
            {**WIDTH, "model_type": "qwen3"},
            "width",
            {},
            "student.arch.model_type is 'qwen3' but the teacher is 'llama'",
        ),
    ],
)
def test_targets_that_cannot_be_cut_are_refused_naming_the_key(tmp_path, arch, method, parallel, expected):
    arch = {k: v for k, v in arch.items() if v is not None}
    config = (
        pruning(tmp_path, arch, method, parallel=parallel) if parallel else pruning(tmp_path, arch, method)
    )
    with pytest.raises(DataError) as error:
        pruned_arch(config, TEACHER)
    assert expected in str(error.value)


def test_a_mixture_of_experts_teacher_is_refused(tmp_path):
    moe = replace(TEACHER, model_type="mixtral", num_experts=4, moe_topk=2, moe_ffn_hidden_size=64)
    with pytest.raises(DataError, match="mixture-of-experts teacher"):
        pruned_arch(pruning(tmp_path, WIDTH), moe)


def test_kept_units_follow_the_scores():
    target = replace(
        TEACHER, hidden_size=3, num_layers=2, num_attention_heads=2, num_key_value_heads=1, ffn_hidden_size=2
    )
    teacher = replace(
        TEACHER, hidden_size=5, num_layers=3, num_attention_heads=4, num_key_value_heads=2, ffn_hidden_size=4
    )
    scores = {
        # group 0 (heads 0, 1) sums 3, group 1 (heads 2, 3) sums 5: keep group 1, its best 1 head... of 2 per group
        "heads": [[1.0, 2.0, 4.0, 1.0], [5.0, 5.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
        "neurons": [[0.1, 0.4, 0.3, 0.2], [1.0, 0.0, 0.0, 2.0], [0.0] * 4],
        "channels": [0.5, 0.1, 0.9, 0.7, 0.2],
        "depth_loss": {
            "blocks": {"0-0": 3.0, "1-1": 2.5, "2-2": 2.5},
            "block_importance": {"layers": [0], "loss": 3.0},
        },
    }
    kept = choose_units(teacher, target, "both", "loss", scores)
    assert kept.layers == [0, 2]  # blocks 1 and 2 tie: the earlier one is dropped
    assert kept.groups == [[1], [0]] and kept.heads == [[2, 3], [0, 1]]
    assert kept.neurons == [[1, 2], [0, 1]]  # layer 2's all-zero scores: the lowest indices
    assert kept.channels == [0, 2, 3]
    assert choose_units(teacher, target, "both", "block_importance", scores).layers == [1, 2]
    fewer_heads = replace(target, num_attention_heads=1)
    assert choose_units(teacher, fewer_heads, "width", "loss", scores).heads[0] == [2]


def test_prune_and_correct_sections_resolve_and_round_trip(tmp_path):
    config = pruning(tmp_path, WIDTH, correct={"dir": str(tmp_path / "fix"), "steps": 5, "lr": 1e-5})
    assert config.teacher is not None and config.correct is not None
    assert config.teacher.path == tmp_path / "fix" / "teacher"  # the corrected teacher is *the* teacher
    assert config.correct.source == tmp_path / "teacher" and config.teacher.tokenizer == tmp_path / "teacher"
    (tmp_path / "again.yaml").write_text(config_to_yaml(config))
    assert load_config(tmp_path / "again.yaml") == config
    assert config.stage_ranks("prune") == 1 and config.stage_ranks("correct") == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"student": {"init": "s"}}, "`prune` needs student.arch"),
        ({"teacher": None, "cache": None}, "`prune` needs a `teacher` section"),
        (
            {"prune": {"dir": "p", "method": "length"}},
            "prune.method: Input should be 'width', 'depth' or 'both'",
        ),
    ],
)
def test_bad_prune_sections(tmp_path, change, expected):
    tree = training_tree(tmp_path)
    tree.update(
        student={"arch": WIDTH, "init_dir": "i"},
        teacher={"path": "t"},
        cache={"dir": "c"},
        prune={"dir": "p"},
    )
    tree.update(change)
    tree = {k: v for k, v in tree.items() if v is not None}
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(write_config(tmp_path / "c.yaml", tree))


def test_correct_needs_a_teacher_and_training(tmp_path):
    tree = training_tree(tmp_path)
    tree["correct"] = {"dir": "f", "steps": 2, "lr": 1e-5}
    with pytest.raises(ConfigError, match="`correct` needs a `teacher` section"):
        load_config(write_config(tmp_path / "c.yaml", tree))


def test_the_stage_refuses_too_many_calibration_sequences_and_another_tokenizer(
    tmp_path, prepared_tiny, tiny_model_dir
):
    from distill.prune.stage import PruneStage

    tree = copy.deepcopy(prepared_tiny)
    arch = {
        "hidden_size": 32,
        "num_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "ffn_hidden_size": 48,
    }
    tree.update(
        student={"arch": arch, "init_dir": str(tmp_path / "init")},
        training={"steps": 1, "global_batch": 2, "micro_batch": 2, "lr": 1e-3},
        checkpoint={"dir": str(tmp_path / "ckpt")},
        logging={"metrics": str(tmp_path / "m.jsonl")},
        teacher={"path": str(tiny_model_dir)},
        cache={"dir": str(tmp_path / "cache")},
        prune={"dir": str(tmp_path / "prune"), "calibration_sequences": 10**6},
    )
    config = load_config(write_config(tmp_path / "c.yaml", tree))
    from distill.data.prepared import PreparedData
    from distill.prune.importance import calibration_rows

    with pytest.raises(
        DataError, match=r"prune.calibration_sequences is 1000000, more than the \d+ training sequences"
    ):
        calibration_rows(PreparedData(config.data.dir), config.prune.calibration_sequences)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    model_vocab = vocab["model"]["vocab"]
    first, second = list(model_vocab)[300:302]
    model_vocab[first], model_vocab[second] = model_vocab[second], model_vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    tree["teacher"] = {"path": str(other)}
    with pytest.raises(DataError, match=r"prune: the teacher's tokenizer \(.*other.*\) is not the student's"):
        PruneStage(load_config(write_config(tmp_path / "c2.yaml", tree)))


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_the_cut_keeps_biases_and_qk_norms_and_an_identity_cut_is_the_teacher(tmp_path, kind):
    """Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms): keeping every unit gives the teacher back bit
    for bit; a real cut loads into `transformers` with every tensor in its place."""
    import torch
    import transformers

    from distill.models.hf_io import HFCheckpoint
    from distill.prune.cut import cut_state_dict
    from distill.prune.plan import KeptUnits

    torch.manual_seed(0)
    common = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
        "tie_word_embeddings": False,
    }
    config = (
        transformers.Qwen2Config(**common)
        if kind == "qwen2"
        else transformers.Qwen3Config(**common, head_dim=8)
    )
    teacher = transformers.AutoModelForCausalLM.from_config(config)
    teacher.save_pretrained(tmp_path)
    hf = HFCheckpoint(tmp_path)
    arch = hf.arch
    read = lambda name: hf.read(name, slice(None), slice(None))  # noqa: E731
    everything = KeptUnits([0, 1], [[0, 1]] * 2, [[0, 1, 2, 3]] * 2, [list(range(40))] * 2, list(range(32)))
    whole = cut_state_dict(read, arch, everything)
    assert whole.keys() == {k for k in teacher.state_dict() if "rotary" not in k}
    for name, tensor in whole.items():
        assert torch.equal(tensor, teacher.state_dict()[name]), name
    kept = KeptUnits([1], [[1]], [[2, 3]], [[0, 5, 9, 39]], [0, 3, 4, 8, 15, 16, 30, 31])
    target = replace(
        arch, hidden_size=8, num_layers=1, num_attention_heads=2, num_key_value_heads=1, ffn_hidden_size=4
    )
    student = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**target.to_hf_config())
    )
    student.load_state_dict(cut_state_dict(read, arch, kept), strict=True)
    q = read("model.layers.1.self_attn.q_proj.weight")  # [heads * 8, h]
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight, q[16:32][:, kept.channels])
