import pytest
from transformers import AutoTokenizer

from distill.config import load_config
from distill.data.tokenizer import EOS_TOKEN, ensure_tokenizer, load_tokenizer
from distill.errors import DataError, OutputExistsError
from tests.conftest import prepare_tree, stdlib_texts, write_config


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
