"""The stage contract (`distill/stage.py`): every stage's output directory is complete, partial, fresh,
replaced (with --overwrite) or refused, decided the same way for every stage."""

from __future__ import annotations

import json

import pytest

from distill.errors import DataError, OutputExistsError
from distill.stage import PROGRESS, StageOutput, Status, differences

SPEC = {"seq_len": 64, "domains": {"code": ["a.jsonl"], "legal": ["b.jsonl"]}}


def output(tmp_path, spec=SPEC, **kwargs) -> StageOutput:
    return StageOutput("prepare", tmp_path / "out", "data.dir", spec, **kwargs)


def test_fresh_then_partial_then_complete(tmp_path):
    out = output(tmp_path)
    assert out.check(overwrite=False) is Status.FRESH  # no directory yet
    (tmp_path / "out").mkdir()
    assert out.check(overwrite=False) is Status.FRESH  # an empty directory is fresh too
    out.begin({"a.jsonl": [10, 1]})
    (tmp_path / "out" / "x.bin.tmp").write_text("half")
    assert out.check(overwrite=False, resume_facts={"a.jsonl": [10, 1]}) is Status.PARTIAL
    assert not (tmp_path / "out" / "x.bin.tmp").exists()  # a killed run's temporaries are dropped
    out.finish({"format": "x", "spec": SPEC, "count": 3})
    assert not (tmp_path / "out" / PROGRESS).exists()
    assert out.check(overwrite=False) is Status.COMPLETE
    assert output(tmp_path, {**SPEC}).check(overwrite=False) is Status.COMPLETE  # equal, not identical


def test_another_config_is_refused_naming_every_differing_field(tmp_path):
    output(tmp_path).finish({"spec": SPEC})
    other = output(tmp_path, {"seq_len": 32, "domains": {"code": ["a.jsonl"], "legal": ["c.jsonl"]}})
    with pytest.raises(OutputExistsError) as err:
        other.check(overwrite=False)
    message = str(err.value)
    assert "holds a prepare of a different config" in message and message.endswith(
        "pass --overwrite to replace it"
    )
    assert "seq_len: 64 on disk, 32 in the config" in message
    assert "domains.legal: ['b.jsonl'] on disk, ['c.jsonl'] in the config" in message
    assert "domains.code" not in message
    assert other.check(overwrite=True) is Status.REPLACE
    other.clear()
    assert other.check(overwrite=False) is Status.FRESH


def test_an_interrupted_run_resumes_only_with_the_same_spec_and_inputs(tmp_path):
    output(tmp_path).begin({"a.jsonl": [10, 1]})
    with pytest.raises(
        OutputExistsError, match=r"interrupted prepare .*a\.jsonl: changed since the interrupted"
    ):
        output(tmp_path).check(overwrite=False, resume_facts={"a.jsonl": [11, 2]})
    with pytest.raises(OutputExistsError, match=r"seq_len: 64 on disk, 16 in the config.*start over"):
        output(tmp_path, {**SPEC, "seq_len": 16}).check(overwrite=False, resume_facts={"a.jsonl": [10, 1]})
    assert output(tmp_path).check(overwrite=True, resume_facts={}) is Status.REPLACE


def test_files_no_stage_wrote_are_refused_and_named(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(
        OutputExistsError, match=r"data.dir .* not a distillery prepare \(no manifest.json; precious.txt\)"
    ):
        output(tmp_path).check(overwrite=False)
    hint = output(tmp_path, foreign_hint="remove data.tokenizer.train to use it as it is")
    with pytest.raises(OutputExistsError, match="; remove data.tokenizer.train to use it as it is$"):
        hint.check(overwrite=False)
    (tmp_path / "out" / "manifest.json").write_text("{not json")  # an unreadable record is not ours either
    with pytest.raises(OutputExistsError, match="precious.txt"):
        output(tmp_path).check(overwrite=False)
    assert output(tmp_path).check(overwrite=True) is Status.REPLACE
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"  # check alone deletes nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is not a directory"):
        StageOutput("cache", tmp_path / "file", "cache.dir", SPEC).check(overwrite=True)


def test_whole_record_specs_and_stale_derived_outputs(tmp_path):
    record = {"checkpoint": "/run/step_2", "dtype": "bfloat16"}
    export = StageOutput(
        "export",
        tmp_path / "out",
        "export.dir",
        record,
        record="rec.json",
        spec_field=None,
        replace_stale=True,
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "rec.json").write_text(json.dumps(record))
    assert export.check(overwrite=False) is Status.COMPLETE
    newer = StageOutput(
        "export",
        tmp_path / "out",
        "export.dir",
        {**record, "checkpoint": "/run/step_4"},
        record="rec.json",
        spec_field=None,
        replace_stale=True,
    )
    assert newer.check(overwrite=False) is Status.REPLACE  # a newer checkpoint replaces its own old export


def test_differences_walks_nested_specs():
    assert differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == [
        "a.c: 2 on disk, 3 in the config",
        "d: None on disk, 4 in the config",
    ]
    assert differences([1], [2]) == ["spec: [1] on disk, [2] in the config"]


def test_temporaries_alone_are_not_foreign_and_an_unreadable_progress_record_is_named(tmp_path):
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / f".{PROGRESS}.x1.tmp").write_text("{")  # killed inside begin()
    assert StageOutput("cache", tmp_path / "killed", "cache.dir", SPEC).check(overwrite=False) is Status.FRESH
    (tmp_path / "killed" / PROGRESS).write_text("{")
    with pytest.raises(OutputExistsError, match="unreadable progress record"):
        StageOutput("cache", tmp_path / "killed", "cache.dir", SPEC).check(overwrite=False)


def test_a_checkpoint_of_another_build_is_refused_by_name(tmp_path):
    from distill.checkpoint import FORMAT, FORMAT_VERSION, LATEST, META, read_meta, resolve_checkpoint

    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (tmp_path / "checkpoints" / LATEST).write_text("step_00000004\n")
    (step / META).write_text(json.dumps({"format": FORMAT, "step": 4}))  # a development build's: no version
    with pytest.raises(
        DataError, match=r"step_00000004 is a checkpoint of another distillery build \(format "
    ):
        read_meta(resolve_checkpoint(tmp_path / "checkpoints"))
    (step / META).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "step": 4}))
    assert read_meta(step)["step"] == 4
