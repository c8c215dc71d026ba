"""`distillery eval`: rolling windows, bytes per token, scores against direct transformers math, bad input."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data.prepared import PreparedData
from distill.data.tokenizer import load_tokenizer
from distill.eval.score import score_documents
from distill.eval.text import Document, heldout_documents, packed_label_bytes, token_bytes
from distill.eval.windows import rolling_windows
from tests.conftest import REPO, stdlib_texts

DEMO_TOKENIZER = REPO / "assets" / "demo-teacher"


@pytest.mark.parametrize("length", [1, 5, 16, 17, 33, 70])
@pytest.mark.parametrize("max_len", [1, 4, 16])
def test_rolling_windows_are_lm_eval_windows(length, max_len):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = list(range(100, 100 + length))
    theirs = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(ids, prefix_token=7, max_seq_len=max_len, context_len=1)
    ]
    ours = list(rolling_windows(ids, 7, max_len))
    assert len(ours) == len(theirs)
    for window, (context, continuation) in zip(ours, theirs, strict=True):
        # lm-eval feeds (context + continuation)[:-1] and scores its last len(continuation) logits
        assert window.inputs == (context + continuation)[:-1]
        assert window.targets == continuation
    assert [t for w in ours for t in w.targets] == ids  # every token predicted exactly once


def test_bytes_per_token_add_up_to_the_text(tmp_path):
    info = load_tokenizer(DEMO_TOKENIZER)
    table = token_bytes(info)
    assert table.method == "byte-level" and table.lengths[info.eos_id] == 0
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(info.backend_json)
    texts = [
        "def f(x):\n    return x  # ok\n",
        "Straße, café, naïve — “quotes” and 日本語のテキスト, 中文, emoji 🎉👩‍👩‍👧 end",
        " leading space\ttab\r\nwindows line",
        *stdlib_texts(2),
    ]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert table.count(np.array(ids)) == len(text.encode("utf-8"))


def test_heldout_documents_are_the_prepared_documents(prepared_small, tokenizer_dir, small_corpus):
    data = PreparedData(Path(prepared_small["data"]["dir"]))
    info = load_tokenizer(tokenizer_dir)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(info.backend_json)
    sources = stdlib_texts(24, start=40)  # the code domain's documents
    for domain in data.domains:
        documents = heldout_documents(data, domain, 2, info)
        assert documents, domain
        stream = data.store(domain, "heldout").batch(np.arange(2)).reshape(-1)
        assert sum(len(d.ids) for d in documents) + int((stream == info.eos_id).sum()) >= len(stream) - 3
        for document in documents:
            # re-encoding the text gives the ids scored (what lm-eval will see)
            assert tokenizer.encode(document.text, add_special_tokens=False).ids == document.ids.tolist()
        if domain == "code":  # whole source documents, or the start of one cut where held-out ends
            assert all(any(src.startswith(d.text) for src in sources) for d in documents)
    table = token_bytes(info)
    assert packed_label_bytes(data, "code", 2, table) == table.count(
        data.store("code", "heldout").batch(np.arange(2))[:, 1:]
    )


def test_scores_equal_direct_transformers_math(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    documents = [Document(rng.integers(2, 600, size=n), "x" * n) for n in (3, 9, 20)]
    tally = score_documents(model, documents, prefix=0, max_len=32, micro_batch=2, device=torch.device("cpu"))
    expected = 0.0
    for document in documents:  # shorter than the window: one pass over [prefix] + document
        ids = torch.tensor([[0, *document.ids.tolist()]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        expected -= float(logp.gather(1, ids[0, 1:, None]).sum())
    assert tally.tokens == 32 and tally.bytes == 32 and tally.documents == 3
    assert math.isclose(tally.nll, expected, rel_tol=1e-5)
    summary = tally.summary()
    assert math.isclose(summary["bits_per_byte"], expected / math.log(2) / 32, rel_tol=1e-9)
    assert math.isclose(summary["ppl"], math.exp(expected / 32), rel_tol=1e-9)


def run_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "launcher", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_eval_cli_writes_eval_json_reuses_the_teacher_and_refuses_bad_input(
    tmp_path, prepared_small, tiny_model_dir
):
    from distill.atomic import read_json

    data = prepared_small["data"]["dir"]
    first = run_cli(
        "eval",
        "--data",
        data,
        "--teacher",
        tiny_model_dir,
        f"copy={tiny_model_dir}",
        "--out",
        tmp_path / "a",
        "--quiet",
    )
    assert first.returncode == 0, first.stderr
    record = read_json(tmp_path / "a" / "eval.json")
    teacher, copy = record["models"]["teacher"], record["models"]["copy"]
    assert set(teacher["domains"]) == {"code", "prose"}
    assert teacher["domains"] == copy["domains"]  # the same weights score the same
    assert "bits per UTF-8 byte" in first.stderr and "teacher" in first.stderr
    assert (tmp_path / "a" / "lm_eval" / "distillery_heldout_code.yaml").is_file()

    again = run_cli(
        "eval", "--data", data, "--teacher", tiny_model_dir, f"copy={tiny_model_dir}", "--out", tmp_path / "a"
    )
    assert again.returncode == 0 and "nothing to do" in again.stderr
    other = run_cli("eval", "--data", data, "--teacher", tiny_model_dir, "--out", tmp_path / "b", "--quiet")
    assert other.returncode == 0 and "teacher: reusing" in other.stderr
    assert read_json(tmp_path / "b" / "eval.json")["models"]["teacher"]["domains"] == teacher["domains"]

    not_a_model = run_cli("eval", "--data", data, tmp_path / "a", "--out", tmp_path / "c")
    message = " ".join(not_a_model.stderr.split())
    assert not_a_model.returncode == 2 and "Traceback" not in not_a_model.stderr
    assert f"{tmp_path / 'a'} is neither a Hugging Face model directory" in message

    other_tokenizer = tmp_path / "other-tok"
    from distill.data.tokenizer import train_byte_level_bpe

    train_byte_level_bpe(stdlib_texts(5, start=100), other_tokenizer, vocab_size=400)
    mismatched = tmp_path / "mismatched"
    import shutil

    shutil.copytree(tiny_model_dir, mismatched)
    for f in other_tokenizer.iterdir():
        shutil.copy(f, mismatched / f.name)
    refused = run_cli("eval", "--data", data, mismatched, "--out", tmp_path / "d")
    message = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "is not the one" in message
    assert str(mismatched) in message and data in message


def test_report_without_metrics_is_a_named_error(tmp_path):
    (tmp_path / "run").mkdir()
    result = run_cli("report", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "metrics.jsonl: no metrics file" in " ".join(result.stderr.split())


def test_a_tensor_parallel_checkpoint_scores_like_its_hf_model(tmp_path, prepared_small, tiny_model_dir):
    from distill.atomic import read_json

    imported = run_cli(
        "launch", "--nproc", "2", "--", "import", tiny_model_dir, tmp_path / "ckpt", "--tp", "2"
    )
    assert imported.returncode == 0, imported.stderr
    data = prepared_small["data"]["dir"]
    result = run_cli(
        "eval",
        "--data",
        data,
        f"hf={tiny_model_dir}",
        f"tp2={tmp_path / 'ckpt'}",
        "--out",
        tmp_path / "e",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    models = read_json(tmp_path / "e" / "eval.json")["models"]
    for domain, scores in models["hf"]["domains"].items():
        assert math.isclose(models["tp2"]["domains"][domain]["ce"], scores["ce"], rel_tol=1e-5)
