"""`distill.messages.say`: one line on stderr with its prefix, from the main rank unless every rank speaks."""

import pytest

from distill.messages import process_rank, say


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    """The rank comes from `RANK` here: a process group another test left up would answer instead."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        pytest.skip("a torch.distributed process group is up in this process")
    monkeypatch.delenv("RANK", raising=False)


def test_main_rank_says_it_on_stderr_with_its_prefix(capsys):
    say("train", "resumed from step_00000004 at step 4")
    said = capsys.readouterr()
    assert said.err == "train: resumed from step_00000004 at step 4\n"
    assert said.out == ""


def test_rank_from_the_environment(monkeypatch):
    assert process_rank() == 0
    monkeypatch.setenv("RANK", "3")
    assert process_rank() == 3


def test_another_rank_is_silent(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    say("train", "starting")
    said = capsys.readouterr()
    assert said.err == "" and said.out == ""


def test_every_rank_speaks_when_asked_and_names_itself(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    say("distillery", "error: no such file", all_ranks=True)
    said = capsys.readouterr()
    assert said.err == "distillery [rank 1]: error: no such file\n"
    assert said.out == ""
    monkeypatch.setenv("RANK", "0")
    say("distillery", "error: no such file", all_ranks=True)
    assert capsys.readouterr().err == "distillery [rank 0]: error: no such file\n"


def test_a_several_line_message_keeps_its_lines(capsys):
    say("eval", "held-out bits per byte\ndomain  student\ncode    1.2345")
    assert capsys.readouterr().err == "eval: held-out bits per byte\ndomain  student\ncode    1.2345\n"
