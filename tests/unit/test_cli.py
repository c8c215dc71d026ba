import subprocess
import sys

from tests.helpers import REPO, distillery, write_config


def test_help_lists_the_existing_subcommands():
    result = distillery("--help", timeout=120)
    assert result.returncode == 0
    for command in (
        "run",
        "config",
        "corpus",
        "tokenizer",
        "prepare",
        "cache",
        "train",
        "import",
        "export",
        "launch",
    ):
        assert f"    {command}" in result.stdout
    cache = distillery("cache", "--help", timeout=120)
    assert (
        cache.returncode == 0
        and "distillery cache verify" in cache.stdout
        and "distillery cache inspect" in cache.stdout
    )


def test_validate_and_show_the_demo_config():
    assert distillery("config", "validate", "configs/demo.yaml", timeout=120).returncode == 0
    shown = distillery("config", "show", "configs/demo.yaml", "--set", "data.seq_len=32", timeout=120)
    assert shown.returncode == 0 and "seq_len: 32" in shown.stdout
    assert str(REPO / "runs" / "demo" / "corpus") in shown.stdout  # references resolved, paths absolute


def test_user_error_exits_2_with_a_paragraph_and_no_traceback(tmp_path):
    path = write_config(tmp_path / "bad.yaml", {"run": {"name": "x", "dir": "r", "colour": "red"}})
    result = distillery("config", "validate", str(path), timeout=120)
    assert result.returncode == 2
    assert "run.colour: unknown key" in result.stderr and "data: required key is missing" in result.stderr
    assert "Traceback" not in result.stderr
    debug = distillery("--debug", "config", "validate", str(path), timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_missing_tokenizer_directory_is_a_user_error(tmp_path):
    tree = {
        "run": {"name": "x", "dir": str(tmp_path)},
        "data": {
            "tokenizer": {"path": str(tmp_path / "no-tokenizer")},
            "seq_len": 8,
            "dir": str(tmp_path / "p"),
            "domains": {"a": {"sources": [{"files": str(tmp_path / "*.jsonl")}]}},
        },
    }
    result = distillery("prepare", str(write_config(tmp_path / "c.yaml", tree)), timeout=120)
    assert result.returncode == 2 and "no-tokenizer does not exist" in " ".join(result.stderr.split())


def test_launched_ranks_failing_on_user_input_print_one_message_and_exit_2():
    result = distillery("launch", "--nproc", "2", "--", "train", "/no/such/config.yaml", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("config file /no/such/config.yaml does not exist") == 1
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


def test_launch_failure_reports(tmp_path):
    """How a failed job is summarised from the ranks' reports and exit codes."""
    from launcher.local import _failure

    (tmp_path / "rank_00000.user").write_text("cache shard x is damaged")
    (tmp_path / "rank_00001.crash").write_text("Traceback ...\nRuntimeError: Connection closed by peer\n")
    consequence = _failure(tmp_path, {0: 2, 1: 1})
    assert (consequence.code, str(consequence)) == (2, "cache shard x is damaged")
    (tmp_path / "rank_00001.crash").unlink()
    (tmp_path / "rank_00001.user").write_text("other")
    both = _failure(tmp_path, {0: 2, 1: 2})
    assert both.code == 2 and "rank 0: cache shard x is damaged" in str(both) and "rank 1: other" in str(both)
    for p in tmp_path.iterdir():
        p.unlink()
    (tmp_path / "rank_00001.crash").write_text("Traceback ...\nZeroDivisionError\n")
    crash = _failure(tmp_path, {1: 1, 0: -9})
    assert crash.code == 1
    assert (
        str(crash)
        == "the job failed: rank 0 was killed by SIGKILL; rank 1 exited with code 1 (tracebacks above)"
    )


def test_a_rank_whose_launcher_died_while_it_started_ends_instead_of_running(tmp_path):
    """The launcher (agent) starts a rank and is gone before the rank could ask to die with it: the rank,
    now a child of init, must end at once rather than run (or wait for peers) forever."""
    import json
    import textwrap
    import time

    log = tmp_path / "rank.err"
    rank_code = (
        "import sys, time; time.sleep(1); from launcher.cli import main; "
        "sys.exit(main(['config', 'validate', 'configs/demo.yaml']))"
    )
    agent = textwrap.dedent(
        f"""
        import os, subprocess, sys
        env = {{**os.environ, "DISTILLERY_RANK_REPORTS": {str(tmp_path)!r}, "RANK": "0",
               "DISTILLERY_AGENT_PID": str(os.getpid())}}
        subprocess.Popen([sys.executable, "-c", {json.dumps(rank_code)}], env=env, stdout=subprocess.DEVNULL,
                         stderr=open({str(log)!r}, "w"))
        """
    )
    assert subprocess.run([sys.executable, "-c", agent], cwd=REPO, timeout=60).returncode == 0
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    assert "rank 0: its launcher (pid " in log.read_text() and "is gone" in log.read_text(), log.read_text()


def test_the_cli_starts_without_importing_torch():
    """Commands a login node runs (`submit`, `status`, `config`, `prepare`) start in a fraction of a second:
    torch, megatron-core and transformers are imported only by the commands that use them."""
    probe = "import sys, launcher.cli; print(sorted({'torch', 'megatron', 'transformers', 'deepspeed'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
