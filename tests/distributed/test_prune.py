"""Minitron: importance of heads, neurons, channels and layers measured on the teacher under its own layout,
the cut, and the campaign with teacher correction.

- The scores at tp2 and pp2 equal tp1 x dp2's (1e-5), and equal the same aggregates computed independently
  with hooks on the plain `transformers` teacher (one launch of 2 ranks: `ranks/check_prune.py`).
- The pruned student's logits equal an independent reference: the teacher's `transformers` tensors sliced
  in this test by the kept indices (float32, 1e-5); the indices chosen from the tp2 scores are tp1's.
- A campaign corrects the teacher, caches it, prunes it into the student, trains and exports: the card
  names the corrected teacher and the pruning, and the pruned student starts far below a random init.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distill.atomic import read_json
from tests.distributed import run_ranks
from tests.helpers import distillery, training_section, write_config

TARGET = {  # of the teacher's 48 channels, 4 layers, 6 heads in 2 groups, FFN 64
    "hidden_size": 32,
    "num_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "ffn_hidden_size": 48,
    "max_position_embeddings": 64,
}
CALIBRATION = 24


def prunable_teacher(out: Path, tokenizer: Path) -> Path:
    """A tiny random Llama with untied embeddings, 3 query heads per group and perturbed norm weights (so
    no channel or layer is like another)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.tokenizer_files import copy_tokenizer_files

    torch.manual_seed(11)
    config = LlamaConfig(
        vocab_size=640,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    copy_tokenizer_files(tokenizer, out)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory, prepared_tiny, tokenizer_dir) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("prune")
    teacher = prunable_teacher(work / "teacher", tokenizer_dir)
    tree = copy.deepcopy(prepared_tiny)
    tree.update(
        teacher={"path": str(teacher), "micro_batch": 4},
        cache={"dir": str(work / "cache")},  # not written: the layouts of the pruning are the teacher's own
        student={"arch": TARGET, "init_dir": str(work / "student-init")},
        prune={"method": "both", "calibration_sequences": CALIBRATION, "dir": str(work / "prune")},
        training=training_section(),
        checkpoint={"dir": "${run.dir}/checkpoints"},
        logging={"metrics": "${run.dir}/metrics.jsonl"},
    )
    write_config(work / "config.yaml", tree)
    found = run_ranks("check_prune.py", 2, tmp_path_factory.mktemp("prune_out"), str(work))[0]
    scores = {layout: read_json(Path(d) / "importance.json")["scores"] for layout, d in found.items()}
    return {"work": work, "tree": tree, "teacher": teacher, "scores": scores}


def _close(a: Any, b: Any, key: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            _close(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, list) and a and isinstance(a[0], str | int) and not isinstance(a[0], bool):
        assert a == b, key
    else:
        np.testing.assert_allclose(
            np.asarray(a, float), np.asarray(b, float), rtol=1e-5, atol=1e-7, err_msg=key
        )


def test_importance_is_the_same_at_tp2_and_pp2(work):
    reference = work["scores"]["tp1pp1"]
    assert reference["sequences"] == CALIBRATION
    assert set(reference["depth_loss"]["blocks"]) == {"0-0", "1-1", "2-2", "3-3"}  # one layer to drop
    for layout in ("tp2pp1", "tp1pp2"):
        _close(work["scores"][layout], reference, layout)


def _calibration(tree: dict) -> torch.Tensor:
    """The calibration sequences, taken here without distillery's helper: every domain in turn."""
    from distill.data.prepared import PreparedData

    data = PreparedData(Path(tree["data"]["dir"]))
    rows, taken = [], dict.fromkeys(data.domains, 0)
    while len(rows) < CALIBRATION:
        for domain in data.domains:
            if taken[domain] < data.num_sequences(domain, "train") and len(rows) < CALIBRATION:
                rows.append(torch.from_numpy(data.store(domain, "train").batch([taken[domain]])))
                taken[domain] += 1
    return torch.cat(rows).long()  # [n, s + 1]


def test_importance_equals_transformers_hooks(work):
    """The same aggregates from hooks on the `transformers` teacher: o_proj inputs per head, down_proj
    inputs per neuron, every RMSNorm output per channel, cosine of each layer's input and output; and the
    calibration loss with each layer removed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(work["teacher"]), dtype=torch.float32).eval()
    tokens = _calibration(work["tree"])
    cfg = model.config
    layers, heads, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    sums = {
        "heads": torch.zeros(layers, heads, dtype=torch.float64),
        "neurons": torch.zeros(layers, cfg.intermediate_size, dtype=torch.float64),
        "norms": torch.zeros(2 * layers + 1, cfg.hidden_size, dtype=torch.float64),
        "cos": torch.zeros(layers, dtype=torch.float64),
    }

    def l2_of_means(x: torch.Tensor) -> torch.Tensor:  # [b, s, n] -> [n]
        return x.mean(dim=1).double().square().sum(dim=0)

    hooks = []
    for i, layer in enumerate(model.model.layers):

        def attn(_m, args, i=i):
            b, s, _ = args[0].shape
            sums["heads"][i] += l2_of_means(args[0].reshape(b, s, heads, hd).norm(dim=-1))

        def mlp(_m, args, i=i):
            sums["neurons"][i] += l2_of_means(args[0].abs())

        def norm(_m, _args, out, row=0):
            sums["norms"][row] += l2_of_means(out.abs())

        def cos(_m, args, kwargs, out, i=i):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            sums["cos"][i] += torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).double().sum()

        hooks += [
            layer.self_attn.o_proj.register_forward_pre_hook(attn),
            layer.mlp.down_proj.register_forward_pre_hook(mlp),
            layer.input_layernorm.register_forward_hook(lambda m, a, o, r=2 * i: norm(m, a, o, r)),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, r=2 * i + 1: norm(m, a, o, r)
            ),
            layer.register_forward_hook(cos, with_kwargs=True),
        ]
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: norm(m, a, o, 2 * layers)))
    with torch.no_grad():
        model(input_ids=tokens[:, :-1])
    for hook in hooks:
        hook.remove()
    ours = work["scores"]["tp1pp1"]
    positions = tokens.shape[0] * (tokens.shape[1] - 1)
    _close(ours["heads"], sums["heads"].sqrt().tolist(), "heads")
    _close(ours["neurons"], sums["neurons"].sqrt().tolist(), "neurons")
    _close(ours["channels"], sums["norms"].sqrt().sum(dim=0).tolist(), "channels")
    _close(ours["block_importance"], (1 - sums["cos"] / positions).tolist(), "block_importance")

    def loss_without(skip: set[int]) -> float:
        kept = torch.nn.ModuleList([m for i, m in enumerate(model.model.layers) if i not in skip])
        whole, model.model.layers = model.model.layers, kept
        try:
            with torch.no_grad():
                logits = model(input_ids=tokens[:, :-1]).logits
        finally:
            model.model.layers = whole
        return float(
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        )

    depth = ours["depth_loss"]
    assert depth["whole"] == pytest.approx(loss_without(set()), rel=1e-5)
    for block, loss in depth["blocks"].items():
        assert loss == pytest.approx(loss_without({int(block.split("-")[0])}), rel=1e-5), block


def reference_student(teacher: Any, kept: dict[str, Any]) -> Any:
    """The teacher's `transformers` tensors sliced by `kept`, through views of heads (this test's own cut)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = teacher.config
    hd, h = t.head_dim, t.hidden_size
    sizes = {
        "hidden_size": TARGET["hidden_size"],
        "num_hidden_layers": TARGET["num_layers"],
        "num_attention_heads": TARGET["num_attention_heads"],
        "num_key_value_heads": TARGET["num_key_value_heads"],
        "intermediate_size": TARGET["ffn_hidden_size"],
        "head_dim": hd,
    }
    config = LlamaConfig(**{**t.to_dict(), **sizes})
    student = LlamaForCausalLM(config).eval()
    ch = torch.tensor(kept["channels"])
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight[:, ch])
        student.lm_head.weight.copy_(teacher.lm_head.weight[:, ch])
        student.model.norm.weight.copy_(teacher.model.norm.weight[ch])
        for new, old in enumerate(kept["layers"]):
            src, dst = teacher.model.layers[old], student.model.layers[new]
            heads, groups, neurons = (torch.tensor(kept[k][new]) for k in ("heads", "groups", "neurons"))
            q = src.self_attn.q_proj.weight.view(-1, hd, h)[heads]  # [heads', hd, h]
            dst.self_attn.q_proj.weight.copy_(q.reshape(-1, h)[:, ch])
            for name in ("k_proj", "v_proj"):
                w = getattr(src.self_attn, name).weight.view(-1, hd, h)[groups]
                getattr(dst.self_attn, name).weight.copy_(w.reshape(-1, h)[:, ch])
            o = src.self_attn.o_proj.weight.view(h, -1, hd)[:, heads]  # [h, heads', hd]
            dst.self_attn.o_proj.weight.copy_(o.reshape(h, -1)[ch])
            dst.mlp.gate_proj.weight.copy_(src.mlp.gate_proj.weight[neurons][:, ch])
            dst.mlp.up_proj.weight.copy_(src.mlp.up_proj.weight[neurons][:, ch])
            dst.mlp.down_proj.weight.copy_(src.mlp.down_proj.weight[ch][:, neurons])
            dst.input_layernorm.weight.copy_(src.input_layernorm.weight[ch])
            dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight[ch])
    return student


def test_pruned_logits_equal_slicing_the_teacher_and_tp2_chooses_as_tp1(work, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill.config import load_config
    from distill.prune.stage import PruneStage

    kept = {}
    for layout in ("tp1pp1", "tp2pp1"):
        config = load_config(
            work["work"] / "config.yaml",
            [f"prune.dir={work['work']}/prune_{layout}", f"student.init_dir={tmp_path}/{layout}"],
        )
        PruneStage(config).write_student(overwrite=False)
        kept[layout] = read_json(tmp_path / layout / "distillery_prune.json")["kept"]
    assert kept["tp2pp1"] == kept["tp1pp1"]
    chosen = kept["tp1pp1"]
    depth = work["scores"]["tp1pp1"]["depth_loss"]["blocks"]
    assert [i for i in range(4) if i not in chosen["layers"]] == [int(min(depth, key=depth.get)[0])]
    assert all(len(h) == 4 and len(g) == 2 for h, g in zip(chosen["heads"], chosen["groups"], strict=True))
    teacher = AutoModelForCausalLM.from_pretrained(str(work["teacher"]), dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tp1pp1"), dtype=torch.float32).eval()
    reference = reference_student(teacher, chosen)
    tokens = _calibration(work["tree"])[:4, :-1]
    with torch.no_grad():
        assert (ours(input_ids=tokens).logits - reference(input_ids=tokens).logits).abs().max() < 1e-5


def test_a_corrected_teacher_pruned_into_the_student_trains_and_is_carded(work, tmp_path):
    """correct -> prune -> train -> export on one config: `teacher.path` names the corrected teacher, the
    pruning reads it, the train stage starts from the pruned weights, the card says both."""
    tree = copy.deepcopy(work["tree"])
    tree["run"] = {"name": "minitron", "dir": str(tmp_path / "run")}
    tree["teacher"]["mode"] = "online"
    del tree["cache"]
    tree["loss"] = {"weights": {"ce": 0.5, "forward_kl": 1.0}}
    tree.update(
        correct={"dir": "${run.dir}/correct", "steps": 2, "lr": 1e-4},
        prune={"method": "width", "calibration_sequences": 8, "dir": "${run.dir}/prune"},
        student={"arch": {**TARGET, "num_layers": 4}, "init_dir": "${run.dir}/student-init"},
        training=training_section(steps=2, lr=1e-9),
        export={"dir": "${run.dir}/student", "dtype": "float32"},
        eval={"dir": "${run.dir}/eval", "sequences": 2, "teacher": False},
    )
    path = write_config(tmp_path / "minitron.yaml", tree)
    done = distillery("run", path, "--quiet", "--stages", "correct,prune,train,export")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    resolved = read_json(run / "student-init" / "distillery_prune.json")
    assert resolved["teacher"] == str(run / "correct" / "teacher")
    from distill.models.weights import directory_sha256

    assert resolved["spec"]["teacher_sha256"] == directory_sha256(run / "correct" / "teacher")
    assert directory_sha256(run / "correct" / "teacher") != directory_sha256(
        work["teacher"]
    )  # it was trained
    step0 = read_json(run / "prune" / "step0" / "eval.json")["models"]
    assert set(step0) == {"pruned", "random init"}
    # lr 1e-9: the exported student is its initial weights, which are the pruned ones
    from safetensors.torch import load_file

    pruned = load_file(run / "student-init" / "model.safetensors")
    trained = load_file(run / "student" / "model.safetensors")
    assert pruned.keys() == trained.keys()
    for name, tensor in pruned.items():
        assert torch.allclose(trained[name], tensor, atol=1e-6), name
    card = (run / "student" / "README.md").read_text()
    assert "pruned from" in card and "method width" in card and "calibration tokens" in card
    assert "The teacher was first corrected" in card and "fine-tuned for 2 steps" in card
