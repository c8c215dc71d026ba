"""`distillery report`: plots that a person can read, report.md; the FLOPs formula behind MFU."""

import json

import numpy as np

from distill.report import plots
from distill.report.build import build_report
from distill.training.throughput import flops_per_token, matmul_parameters, peak_tflops
from parallel.model import ModelArch

DOMAINS = ["code", "legal", "docs"]


def write_metrics(path, *, ce_only=False):
    rng = np.random.default_rng(0)
    records = [
        {
            "step": 0,
            "device": "cpu",
            "devices": 2,
            "peak_tflops": None,
            "student_parameters": 1000,
            "tokens_per_step": 4096,
        }
    ]
    if not ce_only:
        records.append({"step": 0, **{f"teacher/{d}/bpb": 1.0 + i / 10 for i, d in enumerate(DOMAINS)}})
    for step in range(10, 101, 10):
        term = "ce" if ce_only else "forward_kl"
        record = {
            "step": step,
            "time": 1000.0 + step,
            "loss": 8 - step / 20,
            f"loss/{term}": 8 - step / 20,
            "tokens_per_s": 4000 + rng.normal(0, 100),
            "step_seconds": 1.0,
            "time/data": 0.01,
            "time/teacher_wait": 0.02,
            "time/forward_backward": 0.8,
            "time/optimizer": 0.1,
            "time/other": 0.07,
            "tflops_per_device": 0.05,
            "memory/host_peak_gib": 1.5,
        }
        if not ce_only:
            record["taid/tau"] = 0.4 + step / 200
        records.append(record)
        if step % 30 == 0:
            records.append(
                {"step": step, **{f"eval/{d}/bpb": 3 - step / 100 + (0.3 if ce_only else 0) for d in DOMAINS}}
            )
            if not ce_only:
                weights = rng.dirichlet(np.ones(len(DOMAINS)))
                records.append(
                    {
                        "step": step,
                        **{f"mixture/{d}": float(w) for d, w in zip(DOMAINS, weights, strict=True)},
                        **{f"ddk/min_weight/{d}": 0.125 for d in DOMAINS},
                        **{f"ddk/max_weight/{d}": 0.5 for d in DOMAINS},
                    }
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 11, "lo', encoding="utf-8")


def test_ddk_plot_draws_the_weight_bounds(tmp_path, monkeypatch):
    from distill.report import plots
    from distill.report.metrics_file import read_metrics

    write_metrics(tmp_path / "metrics.jsonl")
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.plot_mixture(read_metrics(tmp_path / "metrics.jsonl"), tmp_path) is not None
    lines = figures[0].axes[0].get_lines()
    flat = {line.get_label(): set(line.get_ydata()) for line in lines if len(set(line.get_ydata())) == 1}
    assert flat["min weight"] == {0.125} and flat["max weight"] == {0.5}


def test_report_writes_readable_plots_and_a_summary(tmp_path, monkeypatch):
    import matplotlib.image

    run = tmp_path / "run"
    write_metrics(run / "metrics.jsonl")
    write_metrics(run / "baseline" / "metrics.jsonl", ce_only=True)
    evaluation = {
        "protocol": {"sequences": 32, "max_len": 256, "dtype": "float32"},
        "models": {
            name: {
                "domains": {d: {"bits_per_byte": b, "ppl": 10.0} for d in DOMAINS},
                "all": {"bits_per_byte": b, "ppl": 10.0},
            }
            for name, b in (("teacher", 1.0), ("student", 2.0), ("baseline", 2.5))
        },
    }
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(evaluation))

    overlaps = []
    original = plots._save

    def checked_save(fig, path):  # every title, axis label and legend apart from every other
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = []
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            texts = [ax.title, ax.xaxis.label, ax.yaxis.label]
            boxes += [(path.name, t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text()]
            if ax.get_legend() is not None:
                boxes.append((path.name, "legend", ax.get_legend().get_window_extent(renderer)))
        for i, (_, a, box_a) in enumerate(boxes):
            for _, b, box_b in boxes[i + 1 :]:
                if box_a.overlaps(box_b):
                    overlaps.append((path.name, a, b))
            assert 0 <= box_a.x0 and box_a.x1 <= fig.bbox.width + 1, (path.name, a, "outside the figure")
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", checked_save)
    out = build_report(run)
    assert not overlaps, overlaps
    names = {"loss.png", "heldout_bits_per_byte.png", "ddk_weights.png", "taid_tau.png", "throughput.png"}
    assert names <= {p.name for p in out.iterdir()}
    for name in names:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] >= 400 and image.shape[1] >= 700 and image.std() > 0.01  # not blank
    report = (out / "report.md").read_text()
    assert "| code | 1.0000 | 10.00 | 2.0000 | 10.00 | 2.5000 | 10.00 |" in report
    assert "not estimated: no peak known" in report and "unreadable metric lines skipped | 1" in report
    for name in names:
        assert f"]({name})" in report


def test_flops_per_token_counts_the_matmul_weights_of_the_hf_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    for tied in (True, False):
        arch = ModelArch.from_hf_config(
            {
                "model_type": "llama",
                "vocab_size": 512,
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "tie_word_embeddings": tied,
                "max_position_embeddings": 128,
            }
        )
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch.to_hf_config()))
        import torch

        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert matmul_parameters(arch) == linear  # the output layer counted, the lookup not
        seq = 128
        assert flops_per_token(arch, seq, backward=True) == 6 * linear + 12 * 3 * seq * 64
        assert flops_per_token(arch, seq, backward=False) == 2 * linear + 4 * 3 * seq * 64


def test_peak_tflops_comes_from_config_else_none_on_cpu():
    import torch

    assert peak_tflops(123.0, torch.device("cpu")) == 123.0
    assert peak_tflops(None, torch.device("cpu")) is None


def test_model_card_names_models_by_hub_id_or_name_and_hash_never_by_path():
    from distill.models.model_card import named, render_model_card
    from parallel.model import ModelArch

    assert named("hf://Qwen/Qwen3-8B", "ab" * 32) == "`Qwen/Qwen3-8B`"
    assert (
        named("/tmp/x/assets/demo-teacher", "0123456789abcdef" * 4)
        == "`demo-teacher` (sha256 0123456789abcdef)"
    )
    assert named(None, None) == "not recorded"
    arch = ModelArch("llama", 64, 16, 1, 2, 2, 32, head_dim=8, max_position_embeddings=64)
    state = {
        "provenance": {
            "config": {"data": {"tokenizer": {"path": "/home/me/tok"}}, "export": {"hub_id": "me/student"}},
            "data": {"tokenizer_sha256": "f" * 64},
            "teacher": {
                "path": "/home/me/teacher",
                "parameters": 10,
                "sha256": "e" * 64,
                "signal": "cache /home/me/run/cache (top-k)",
            },
        }
    }
    card = render_model_card(arch, state, name="s", location="me/student")
    assert "/home/me" not in card and "`teacher` (sha256 eeeeeeeeeeeeeeee)" in card
    assert "- signal: cache run/cache (top-k)" in card
    assert "`tok` (sha256 ffffffffffffffff)" in card and 'from_pretrained("me/student")' in card
