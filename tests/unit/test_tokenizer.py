import json
import re

import pytest
from transformers import AutoTokenizer

from distill.config import load_config
from distill.data.tokenizer import (
    BYTE_TOKENS,
    EOS_TOKEN,
    PAD_TOKEN,
    TRAINING_RECORD,
    UNK_TOKEN,
    ensure_tokenizer,
    load_tokenizer,
)
from distill.errors import ConfigError, DataError, OutputExistsError
from tests.helpers import prepare_tree, stdlib_texts, write_config


def test_trained_tokenizer_loads_with_autotokenizer_and_round_trips(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "def f(x):\n    return x ** 2  # größer, 数字 ✓\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless on any UTF-8
    assert tok.eos_token == EOS_TOKEN and len(tok) == 600
    info = load_tokenizer(tokenizer_dir)
    assert info.eos_id == tok.eos_token_id and info.vocab_size == 600
    assert load_tokenizer(tokenizer_dir).sha256 == info.sha256


def config(tmp_path, small_corpus, **train):
    tree = prepare_tree(tmp_path / "run", small_corpus, tmp_path / "tok")
    tree["data"]["tokenizer"]["train"] = {"vocab_size": 400, "max_bytes_per_domain": 100_000, **train}
    return load_config(write_config(tmp_path / "c.yaml", tree))


def test_campaign_tokenizer_is_trained_once_and_checked(tmp_path, small_corpus):
    first = ensure_tokenizer(config(tmp_path, small_corpus).data)
    assert first.vocab_size == 400
    assert ensure_tokenizer(config(tmp_path, small_corpus).data).sha256 == first.sha256
    with pytest.raises(OutputExistsError, match=r"vocab_size: 400 on disk, 500 in the config"):
        ensure_tokenizer(config(tmp_path, small_corpus, vocab_size=500).data)
    again = ensure_tokenizer(config(tmp_path, small_corpus, vocab_size=500).data, overwrite=True)
    assert again.vocab_size == 500 and again.sha256 != first.sha256


def test_a_moved_corpus_needs_no_retraining(tmp_path, small_corpus, capsys):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    first = ensure_tokenizer(config(tmp_path, corpus).data)
    corpus.rename(tmp_path / "moved")
    capsys.readouterr()
    assert ensure_tokenizer(config(tmp_path, tmp_path / "moved").data).sha256 == first.sha256
    assert "is complete, nothing to do" in capsys.readouterr().err


def test_foreign_tokenizer_directory_is_not_trained_over(tmp_path, small_corpus, tokenizer_dir):
    import shutil

    shutil.copytree(tokenizer_dir, tmp_path / "tok")
    (tmp_path / "tok" / "distillery_tokenizer.json").unlink()
    with pytest.raises(OutputExistsError, match="not a distillery tokenizer .*remove data.tokenizer.train"):
        ensure_tokenizer(config(tmp_path, small_corpus).data)


def test_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(stdlib_texts(2), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(str(tmp_path / "noeos"))
    with pytest.raises(DataError, match="defines no eos_token"):
        load_tokenizer(tmp_path / "noeos")


# Unigram (SentencePiece-style, byte fallback). Texts with what a tokenizer most easily gets wrong:
# runs of spaces, leading/trailing spaces, tabs and newlines, accents, CJK, emoji, control characters,
# characters the training text never had, and text that spells the names of the reserved tokens.
ROUND_TRIP_TEXTS = [
    "def f(x):\n    return x ** 2  # größer, 数字 ✓\n",
    "  leading, trailing  and   multiple    spaces  ",
    " ",
    "\t\ttabs\tand\r\nnewlines\n\n\n",
    "naïve café, Ærøskøbing, façade, señor, Đorđe, İstanbul",
    "漢字とかな、한국어, 中文没有空格",
    "emoji 😀🚀👩‍👩‍👧 ✓ ∑ ≠ ∞",
    "never seen: \x00\x07\x1b\x7f \u200b\ufeff ẞ ǅ \U0001f9ec \U0010fffd",
    "spelled-out reserved names: <0x41> <0x0a> <0x+a> <unk> <|pad",
]


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory):
    from distill.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("unigram") / "tokenizer"
    train_tokenizer(stdlib_texts(6), out, algorithm="unigram", vocab_size=500)
    return out


def backend_of(info):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(info.backend_json)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_unigram_round_trips_any_text_without_unknown_tokens(unigram_dir, text):
    info = load_tokenizer(unigram_dir)
    backend = backend_of(info)  # what prepare's workers encode with
    ids = backend.encode(text, add_special_tokens=False).ids
    assert backend.decode(ids, skip_special_tokens=False) == text
    assert backend.token_to_id(UNK_TOKEN) not in ids
    tok = AutoTokenizer.from_pretrained(str(unigram_dir))
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_unigram_token_bytes_add_up_to_the_utf8_bytes(unigram_dir, text):
    from distill.eval.text import token_bytes

    info = load_tokenizer(unigram_dir)
    table = token_bytes(info)
    assert table.method == "sentencepiece"
    ids = backend_of(info).encode(text, add_special_tokens=False).ids
    assert table.lengths[ids].sum() == len(text.encode())


def test_unigram_has_byte_fallback_and_the_layout_of_the_bpe(unigram_dir, tokenizer_dir):
    info = load_tokenizer(unigram_dir)
    spec = json.loads(info.backend_json)
    model = spec["model"]
    assert model["type"] == "Unigram" and model["byte_fallback"] is True
    pieces = [piece for piece, _ in model["vocab"]]
    assert pieces[:3] == [EOS_TOKEN, PAD_TOKEN, UNK_TOKEN] and model["unk_id"] == 2
    assert pieces[3:259] == [f"<0x{b:02X}>" for b in range(256)] == list(BYTE_TOKENS)
    assert len(set(pieces)) == len(pieces) == info.vocab_size == 500
    assert spec["normalizer"] is None
    tok = AutoTokenizer.from_pretrained(str(unigram_dir))
    bpe = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for t in (tok, bpe):  # the same special tokens at the same ids
        assert (t.eos_token, t.bos_token, t.pad_token) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
        assert (t.eos_token_id, t.pad_token_id) == (0, 1)
    assert json.loads((unigram_dir / TRAINING_RECORD).read_text())["algorithm"] == "unigram"
    backend = backend_of(info)
    # not in the training text: its UTF-8 bytes; text spelling a byte token: ordinary pieces
    assert backend.encode("ǅ", add_special_tokens=False).tokens == ["<0xC7>", "<0x85>"]
    ids = backend.encode("<0x41><unk>", add_special_tokens=False).ids
    assert all(i >= 259 for i in ids)


def test_unigram_gives_rare_characters_no_piece_and_refuses_a_vocabulary_too_small(tmp_path):
    from distill.data.tokenizer import train_tokenizer

    texts = [*stdlib_texts(3), "once: ǅ"]
    info = train_tokenizer(texts, tmp_path / "tok", algorithm="unigram", vocab_size=400)
    backend = backend_of(info)
    assert backend.token_to_id("ǅ") is None  # below CHARACTER_COVERAGE: byte fallback covers it
    assert backend.decode(backend.encode("ǅ!").ids) == "ǅ!"
    cjk = "".join(chr(0x4E00 + i) for i in range(300))
    with pytest.raises(DataError, match="unigram training failed.*vocab_size 300"):
        train_tokenizer([cjk] * 3, tmp_path / "small", algorithm="unigram", vocab_size=300)
    with pytest.raises(DataError, match="saw no text"):
        train_tokenizer(["", "   "], tmp_path / "empty", algorithm="unigram", vocab_size=400)


def test_unigram_trainer_never_sees_a_run_longer_than_the_cap():
    # tokenizers' UnigramTrainer segfaults on words of ~70k characters (minified code, base64 blobs)
    from distill.data.tokenizer import MAX_TRAINING_RUN, _training_strings

    texts = ["x" * 10_000 + " y " + " " * 9_000 + "z", "ordinary text"]
    strings, _ = _training_strings(texts, keep=set("".join(texts)))
    assert "".join(strings) == "".join(texts)
    runs = [len(run) for s in strings for run in re.findall(r"[^ ]+| +", s)]
    assert max(runs) == MAX_TRAINING_RUN


def test_unigram_decodes_a_literal_metaspace_character_as_a_space(unigram_dir):
    # The one lossy case, as in SentencePiece: U+2581 is how the tokenizer writes a space.
    backend = backend_of(load_tokenizer(unigram_dir))
    assert backend.decode(backend.encode("a\u2581b").ids) == "a b"


def test_unigram_and_bpe_of_the_same_config_differ(tmp_path, small_corpus, capsys):
    bpe = ensure_tokenizer(config(tmp_path, small_corpus).data)
    with pytest.raises(
        OutputExistsError, match=r"algorithm: 'byte_level_bpe' on disk, 'unigram' in the config"
    ):
        ensure_tokenizer(config(tmp_path, small_corpus, algorithm="unigram").data)
    unigram = ensure_tokenizer(config(tmp_path, small_corpus, algorithm="unigram").data, overwrite=True)
    assert "training a unigram (byte fallback) of 400 tokens" in capsys.readouterr().err
    models = [json.loads(info.backend_json)["model"] for info in (bpe, unigram)]
    assert [m["type"] for m in models] == ["BPE", "Unigram"]
    assert set(models[0]["vocab"]) != {piece for piece, _ in models[1]["vocab"]}
    assert bpe.sha256 != unigram.sha256
    assert (bpe.vocab_size, unigram.vocab_size) == (400, 400)  # both exactly what the config asks
    assert ensure_tokenizer(config(tmp_path, small_corpus, algorithm="unigram").data).sha256 == unigram.sha256
    assert "is complete, nothing to do" in capsys.readouterr().err


def test_unknown_algorithm_is_a_config_error(tmp_path, small_corpus):
    with pytest.raises(
        ConfigError, match=r"data\.tokenizer\.train\.algorithm: .*'byte_level_bpe' or 'unigram'"
    ):
        config(tmp_path, small_corpus, algorithm="wordpiece")


def test_the_default_algorithm_named_or_not_is_the_same_tokenizer(tmp_path, small_corpus, capsys):
    first = ensure_tokenizer(config(tmp_path, small_corpus).data)
    assert json.loads((tmp_path / "tok" / TRAINING_RECORD).read_text())["algorithm"] == "byte_level_bpe"
    capsys.readouterr()
    for train in ({}, {"algorithm": "byte_level_bpe"}):
        assert ensure_tokenizer(config(tmp_path, small_corpus, **train).data).sha256 == first.sha256
        assert "is complete, nothing to do" in capsys.readouterr().err


TRAIN_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
from distill.data.tokenizer import train_tokenizer
from tests.helpers import stdlib_texts
texts = stdlib_texts(12) + [ROUND_TRIP_TEXTS]
train_tokenizer(texts, Path(sys.argv[1]), algorithm=sys.argv[2], vocab_size=1000)
"""


@pytest.mark.parametrize("algorithm", ["byte_level_bpe", "unigram"])
def test_training_twice_gives_the_same_bytes_at_any_thread_count(tmp_path, algorithm):
    """Each training in its own process: rayon's pool size and Rust's hash-map order are per process."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, tree_bytes

    script = TRAIN_IN_A_FRESH_PROCESS.replace("[ROUND_TRIP_TEXTS]", repr(ROUND_TRIP_TEXTS))
    for run, threads in (("a", "1"), ("b", "2")):
        env = {**os.environ, "RAYON_NUM_THREADS": threads, "PYTHONHASHSEED": threads}
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / run), algorithm],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
