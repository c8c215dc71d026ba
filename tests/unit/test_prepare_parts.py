"""`prepare --part I/N` then `prepare`: every byte of data.dir equals a one-part `prepare` of the config.

The reference is a one-part `prepare` into the very same `data.dir` (captured, then removed), so that
`config.yaml` (which holds run.dir and data.dir) and `.source-hashes.json` (which holds the sources'
absolute paths) are compared byte for byte like everything else, with nothing normalised.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill.config import load_config
from distill.data.prepare import pack as prepare_pack
from distill.data.prepare.parts import prepare_part, spec_id, units
from distill.data.prepare.run import prepare
from distill.data.prepare.stage import open_stage
from distill.data.prepared import PreparedData
from distill.errors import OutputExistsError
from launcher.cli import main
from tests.helpers import REPO, distillery, tree_bytes, write_config
from tests.unit.test_bad_records import _messy_prepare_tree


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, small_corpus, tokenizer_dir):
    """Three domains: several files per source, bad records skipped in two files of one source (whose
    share of bad records is under max_bad_fraction only over the whole source), a max_documents source."""
    work = tmp_path_factory.mktemp("parts")
    tree = _messy_prepare_tree(work, small_corpus, tokenizer_dir)
    tree["data"]["max_bad_fraction"] = 0.39  # messy a.jsonl alone: 2 of 5 records bad (0.4)
    tree["data"]["domains"]["capped"] = {
        "sources": [
            {"files": str(small_corpus / "code" / "*.jsonl"), "max_documents": 20},
            {"files": str(small_corpus / "prose" / "*.txt")},
        ]
    }
    config = write_config(work / "campaign.yaml", tree)
    out = work / "run" / "prepared"
    manifest = prepare(load_config(config), progress=False)
    code = manifest["domains"]["code"]["bad_records"]["data.domains.code.sources[1]"]
    assert code["records"] == 8 and sum(code["bad"].values()) == 3 and len(code["examples"]) == 3
    reference = tree_bytes(out, directories=True)
    shutil.rmtree(out)
    return SimpleNamespace(tree=tree, path=config, out=out, reference=reference)


@pytest.fixture
def case(campaign):
    """The campaign with an empty data.dir, emptied again afterwards."""
    shutil.rmtree(campaign.out, ignore_errors=True)
    yield campaign
    shutil.rmtree(campaign.out, ignore_errors=True)


def part(case, index: int, parts: int, **kwargs) -> dict:
    return prepare_part(load_config(case.path), index, parts, progress=False, **kwargs)


def unit_dirs(out: Path) -> dict[str, Path]:
    return {p.name: p for p in (out / ".parts").glob("*/*/unit_*")}


def test_units_follow_the_config(case):
    found = units(_stage(case.path).sources)
    # code: 2 corpus files + 2 messy files; prose: 12 files + 1; capped: 1 whole source + 12 files
    assert [u.domain for u in found] == ["code"] * 4 + ["prose"] * 13 + ["capped"] * 13
    assert [u.index for u in found] == list(range(30))
    assert [u.whole for u in found if u.domain == "capped"] == [True] + [False] * 12
    assert all(len(u.source.files) == 1 for u in found if not u.whole)


def test_two_parts_then_pack_is_byte_identical(case):
    assert part(case, 1, 2)["encoded"] == 15  # in reverse order: the parts are independent
    assert part(case, 0, 2)["encoded"] == 15
    assert len(unit_dirs(case.out)) == 30 and not (case.out / "manifest.json").exists()
    prepare(load_config(case.path), progress=False)
    assert tree_bytes(case.out, directories=True) == case.reference
    # a part of a complete prepare has nothing to do and writes nothing
    assert part(case, 0, 2)["encoded"] == 0
    assert tree_bytes(case.out, directories=True) == case.reference


def test_pack_alone_encodes_missing_units_and_chunks_whole_documents(case, monkeypatch):
    part(case, 0, 3)
    monkeypatch.setattr(prepare_pack, "CHUNK_TOKENS", 50)  # most documents are longer: one per chunk
    prepare(load_config(case.path), progress=False)
    assert tree_bytes(case.out, directories=True) == case.reference


def test_interrupted_unit_is_redone_and_finished_units_are_kept(case):
    part(case, 0, 2)
    done = unit_dirs(case.out)
    victim = done["unit_4"]  # as a stopped part leaves it: a half-written temporary, no unit_4
    stale = victim.with_name(".unit_4.abc123.tmp")
    victim.rename(stale)
    (stale / "unit.json").unlink()
    with open(stale / "tokens.bin", "r+b") as f:
        f.truncate(10)
    stamps = {name: (p / "unit.json").stat().st_mtime_ns for name, p in done.items() if name != "unit_4"}
    assert part(case, 0, 2)["encoded"] == 1
    assert not stale.exists() and (victim / "unit.json").is_file()
    assert {
        name: (p / "unit.json").stat().st_mtime_ns for name, p in done.items() if name != "unit_4"
    } == stamps
    part(case, 1, 2)
    prepare(load_config(case.path), progress=False)
    assert tree_bytes(case.out, directories=True) == case.reference


@pytest.mark.slow
def test_killed_part_resumes_and_the_result_is_byte_identical(case):
    """SIGKILL a real `distillery prepare --part 1/2` between units, re-run it, then part 0 and the pack."""
    command = [sys.executable, "-m", "launcher", "prepare", str(case.path), "--part", "1/2", "--quiet"]
    proc = subprocess.Popen(
        [*command, "--set", "data.batch_chars=1"], cwd=REPO, start_new_session=True, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if unit_dirs(case.out) and list((case.out / ".parts").glob("*/*/.unit_*.tmp")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the part finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(unit_dirs(case.out))
    assert 0 < finished < 15
    resumed = distillery(*command[3:], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{finished} of 15 units already encoded, encoding {15 - finished}" in resumed.stderr
    assert main(["prepare", str(case.path), "--part", "0/2", "--quiet"]) == 0
    assert main(["prepare", str(case.path), "--quiet"]) == 0
    assert tree_bytes(case.out, directories=True) == case.reference


def test_units_of_another_config_are_refused_or_replaced(case):
    part(case, 0, 2)
    mine = spec_id(_stage(case.path).spec)
    other = write_config(
        case.path.with_name("other.yaml"), {**case.tree, "data": {**case.tree["data"], "seq_len": 32}}
    )
    pattern = (
        r"units encoded by `prepare --part` for a different config \(seq_len: 64 on disk, 32 in the config\)"
    )
    with pytest.raises(OutputExistsError, match=pattern + ".*--overwrite"):
        prepare_part(load_config(other), 1, 2, progress=False)
    with pytest.raises(OutputExistsError, match=pattern):
        prepare(load_config(other), progress=False)  # the pack step refuses them too
    assert [p.name for p in (case.out / ".parts").iterdir()] == [mine] and len(unit_dirs(case.out)) == 15
    prepare_part(load_config(other), 1, 2, progress=False, overwrite=True)
    assert [p.name for p in (case.out / ".parts").iterdir()] == [spec_id(_stage(other).spec)]
    manifest = prepare(load_config(other), progress=False)
    assert manifest["seq_len"] == 32 and not (case.out / ".parts").exists()
    # a part of the first config now finds another config's complete output: refused like `prepare`
    with pytest.raises(
        OutputExistsError, match=r"holds a prepare of a different config \(seq_len: 32 on disk"
    ):
        part(case, 0, 2)
    assert PreparedData(case.out).seq_len == 32


def _stage(path: Path):
    return open_stage(load_config(path))


@pytest.mark.parametrize("value", ["2/2", "x", "1", "-1/2", "1/0", "0/2/4", "a/b"])
def test_bad_part_argument_exits_2_naming_it(case, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", str(case.path), f"--part={value}"])
    assert exit_.value.code == 2
    assert "--part" in capsys.readouterr().err
    assert not case.out.exists()


def test_pack_interrupted_after_a_domain_resumes(case, monkeypatch):
    real = prepare_pack._pack_domain

    def stop_at_prose(stage, name, *args):
        if name == "prose":
            raise KeyboardInterrupt
        real(stage, name, *args)

    part(case, 2, 3)
    monkeypatch.setattr(prepare_pack, "_pack_domain", stop_at_prose)
    with pytest.raises(KeyboardInterrupt):
        prepare(load_config(case.path), progress=False)  # encodes the other units, packs `code`, stops
    assert (case.out / "code" / "domain.json").is_file() and (case.out / ".parts").is_dir()
    monkeypatch.setattr(prepare_pack, "_pack_domain", real)
    prepare(load_config(case.path), progress=False)
    assert tree_bytes(case.out, directories=True) == case.reference


@pytest.mark.slow
def test_parts_started_together_do_not_race(case):
    command = [sys.executable, "-m", "launcher", "prepare", str(case.path), "--quiet", "--part"]
    runs = [
        subprocess.Popen([*command, f"{i}/3"], cwd=REPO, stderr=subprocess.PIPE, text=True) for i in range(3)
    ]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    assert len(unit_dirs(case.out)) == 30
    assert main(["prepare", str(case.path), "--quiet"]) == 0
    assert tree_bytes(case.out, directories=True) == case.reference
