"""`distillery eval`: rolling windows, bytes per token, scores against direct transformers math, bad input,
models with another tokenizer than the data's (scored on the text re-encoded). A tensor-parallel
checkpoint scored on gloo ranks: tests/distributed/test_eval_tp.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data.prepared import PreparedData
from distill.data.tokenizer import load_tokenizer
from distill.errors import DataError
from distill.eval.run import EvalSettings, ModelToEval, evaluate
from distill.eval.score import find_data_tokenizer, reencode, score_documents
from distill.eval.text import Document, heldout_documents, packed_label_bytes, token_bytes
from distill.eval.windows import rolling_windows
from distill.eval_table import format_table
from tests import helpers
from tests.helpers import REPO, distillery, stdlib_texts

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


def test_eval_cli_writes_eval_json_reuses_the_teacher_and_refuses_bad_input(
    tmp_path, prepared_small, tiny_model_dir, caplog
):
    from distill.atomic import read_json

    data = prepared_small["data"]["dir"]
    first = distillery(
        "eval",
        "--data",
        data,
        "--teacher",
        tiny_model_dir,
        f"copy={tiny_model_dir}",
        "--out",
        tmp_path / "a",
        "--quiet",
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    record = read_json(tmp_path / "a" / "eval.json")
    teacher, copy = record["models"]["teacher"], record["models"]["copy"]
    assert set(teacher["domains"]) == {"code", "prose"}
    assert teacher["domains"] == copy["domains"]  # the same weights score the same
    assert "bits per UTF-8 byte" in first.stderr and "teacher" in first.stderr
    assert (tmp_path / "a" / "lm_eval" / "distillery_heldout_code.yaml").is_file()
    from lm_eval.tasks import TaskManager

    with caplog.at_level("WARNING"):  # lm-eval finds the task complete: it warns of no missing setting
        loaded = TaskManager(include_path=str(tmp_path / "a" / "lm_eval")).load(["distillery_heldout_code"])
    task = loaded["tasks"]["distillery_heldout_code"]
    assert task.higher_is_better() == {
        "word_perplexity": False,
        "byte_perplexity": False,
        "bits_per_byte": False,
    }
    assert len(task.test_docs()) > 0
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")]

    again = distillery(
        "eval",
        "--data",
        data,
        "--teacher",
        tiny_model_dir,
        f"copy={tiny_model_dir}",
        "--out",
        tmp_path / "a",
        timeout=300,
    )
    assert again.returncode == 0 and "nothing to do" in again.stderr
    other = distillery(
        "eval", "--data", data, "--teacher", tiny_model_dir, "--out", tmp_path / "b", "--quiet", timeout=300
    )
    assert other.returncode == 0 and "teacher: reusing" in other.stderr
    assert read_json(tmp_path / "b" / "eval.json")["models"]["teacher"]["domains"] == teacher["domains"]

    not_a_model = distillery("eval", "--data", data, tmp_path / "a", "--out", tmp_path / "c", timeout=300)
    message = " ".join(not_a_model.stderr.split())
    assert not_a_model.returncode == 2 and "Traceback" not in not_a_model.stderr
    assert f"{tmp_path / 'a'} is neither a Hugging Face model directory" in message


def test_report_without_metrics_is_a_named_error(tmp_path):
    (tmp_path / "run").mkdir()
    result = distillery("report", tmp_path / "run", timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "metrics.jsonl: no metrics file" in " ".join(result.stderr.split())


def tiny_llama(out: Path, tokenizer: Path, vocab_size: int) -> Path:
    """A tiny random HF Llama over `tokenizer` (as `tiny_model_dir`, another vocabulary)."""
    return helpers.tiny_llama(out, tokenizer, vocab_size, seed=1)


@pytest.fixture(scope="module")
def other_tokenizer_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny models whose tokenizer is not the data's byte-level BPE (a ULD teacher's situation): a
    unigram of another vocabulary size, and the same with a lowercasing normalizer (it cannot reproduce
    the text)."""
    import shutil

    from distill.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("other")
    info = train_tokenizer(stdlib_texts(10), root / "tokenizer", algorithm="unigram", vocab_size=400)
    other = tiny_llama(root / "other", root / "tokenizer", info.vocab_size)
    lower = root / "lower"
    shutil.copytree(other, lower)
    spec = json.loads((lower / "tokenizer.json").read_text(encoding="utf-8"))
    lowercase = {"type": "Lowercase"}
    spec["normalizer"] = (
        {"type": "Sequence", "normalizers": [spec["normalizer"], lowercase]}
        if spec["normalizer"]
        else lowercase
    )
    (lower / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return other, lower


def reference_nll(model_dir: Path, texts: list[str], max_len: int) -> tuple[float, int]:
    """Summed NLL (nats) and tokens of `texts` straight from transformers, as lm-eval scores them: the
    text encoded by the model's own tokenizer, a BOS (else EOS) prefix, then chunks of `max_len`
    predictions, each from at most `max_len` tokens of [prefix] + ids ending just before its last target."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    nll, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        x = torch.tensor([prefix, *ids])  # ids[j] is x[j + 1]
        for first in range(0, len(ids), max_len):
            last = min(first + max_len, len(ids))  # predict ids[first:last]
            inputs = x[max(0, last - max_len) : last]
            with torch.no_grad():
                logp = model(input_ids=inputs[None]).logits[0].double().log_softmax(-1)
            targets = x[first + 1 : last + 1]
            nll -= float(logp[-len(targets) :].gather(1, targets[:, None]).sum())
        tokens += len(ids)
    return nll, tokens


def test_a_model_with_another_tokenizer_is_scored_on_the_text_reencoded(
    tmp_path, prepared_small, tiny_model_dir, tokenizer_dir, other_tokenizer_models, capsys
):
    from distill.atomic import read_json

    other, lower = other_tokenizer_models
    data = PreparedData(Path(prepared_small["data"]["dir"]))
    models = [ModelToEval("other", other), ModelToEval("lower", lower), ModelToEval("same", tiny_model_dir)]
    record = evaluate(models, data.directory, tmp_path / "e", EvalSettings(sequences=2), progress=False)
    stderr = capsys.readouterr().err
    scored = record["models"]
    assert scored["same"]["tokenizer"] == {
        "sha256": data.tokenizer_sha256,
        "vocab_size": load_tokenizer(tokenizer_dir).vocab_size,
        "same_as_data": True,
    }
    other_info = load_tokenizer(other)
    assert scored["other"]["tokenizer"] == {
        "sha256": other_info.sha256,
        "vocab_size": other_info.vocab_size,
        "same_as_data": False,
    }
    assert read_json(tmp_path / "e" / "eval.json")["models"] == scored

    data_info = load_tokenizer(tokenizer_dir)
    for domain in data.domains:
        texts = [d.text for d in heldout_documents(data, domain, 2, data_info)]
        nll, tokens = reference_nll(other, texts, data.seq_len)
        got = scored["other"]["domains"][domain]
        assert got["tokens"] == tokens and got["documents"] == len(texts)
        assert (
            got["bytes"]
            == sum(len(t.encode("utf-8")) for t in texts)
            == scored["same"]["domains"][domain]["bytes"]
        )
        assert math.isclose(got["bits_per_byte"], nll / math.log(2) / got["bytes"], rel_tol=1e-6)
        assert got["exact_text"] and got["inexact_documents"] == 0
        assert scored["same"]["domains"][domain]["exact_text"]
        # the lm-eval documents are the data's whichever model comes first
        lines = (tmp_path / "e" / "lm_eval" / f"{domain}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["text"] for line in lines] == texts
    assert scored["other"]["all"]["tokens"] != scored["same"]["all"]["tokens"]

    # a tokenizer that lowercases cannot give back the code's text: scored, but said so
    code = scored["lower"]["domains"]["code"]
    assert not code["exact_text"] and code["inexact_documents"] == code["documents"]
    assert not scored["lower"]["all"]["exact_text"]
    warning = [line for line in stderr.splitlines() if "warning: lower" in line and "'code'" in line]
    assert len(warning) == 1 and "not reproduced exactly" in warning[0]

    table = format_table(record)
    assert table in stderr
    head = table.splitlines()[1].split()
    assert head == ["domain", "other*", "lower*", "same"]
    footnotes = [line for line in table.splitlines() if line.startswith("* ")]
    assert len(footnotes) == 2
    assert footnotes[0].startswith(f"* other: scored with its own tokenizer (sha256 {other_info.sha256[:12]}")
    assert "not reproduced exactly" not in footnotes[0]
    assert footnotes[1].startswith("* lower:") and "documents not reproduced exactly" in footnotes[1]


def test_reencoding_counts_the_documents_that_do_not_round_trip(tokenizer_dir, other_tokenizer_models):
    other, lower = other_tokenizer_models
    documents = [
        Document(np.array([1]), "def f(x):\n    return 'é🎉'\n"),
        Document(np.array([1]), "Upper\tCase"),
    ]
    encoded, inexact = reencode(documents, load_tokenizer(other))
    assert inexact == 0 and [d.text for d in encoded] == [d.text for d in documents]
    assert [d.num_bytes for d in encoded] == [d.num_bytes for d in documents]
    assert reencode(documents, load_tokenizer(lower))[1] == 1  # only the document with capitals


def test_the_data_tokenizer_is_found_or_named(
    tmp_path, prepared_small, tokenizer_dir, other_tokenizer_models
):
    from types import SimpleNamespace

    data = PreparedData(Path(prepared_small["data"]["dir"]))
    other = load_tokenizer(other_tokenizer_models[0])
    same = load_tokenizer(tokenizer_dir)
    assert find_data_tokenizer(data, [other, same]) is same  # a model's, when one has it
    assert find_data_tokenizer(data, [other]).sha256 == data.tokenizer_sha256  # else the manifest's path
    gone = SimpleNamespace(
        directory=data.directory,
        tokenizer_sha256=data.tokenizer_sha256,
        manifest={"tokenizer": {"path": str(tmp_path / "gone")}},
    )
    with pytest.raises(DataError, match="decoded with the tokenizer it was prepared with"):
        find_data_tokenizer(gone, [other])
    moved = SimpleNamespace(
        **{**vars(gone), "manifest": {"tokenizer": {"path": str(other_tokenizer_models[0])}}}
    )
    with pytest.raises(DataError, match="is now another tokenizer"):
        find_data_tokenizer(moved, [other])
