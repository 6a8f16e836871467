"""The tests' command server (tests/cli_server.py) must run a command exactly as a fresh interpreter does."""

from __future__ import annotations

import pytest

from .conftest import cli_env, run_cli


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "args", "code"),
    [
        ("finetune.train", ["data.batch_size=0"], 2),  # a user error: one line, exit 2
        ("finetune.train", ["--help"], 0),
        ("finetune.evaluate", [], 2),  # no checkpoint given
        ("finetune.train", ["data=folder", "data.root=missing", "trainer.max_epochs=1"], 2),
    ],
)
def test_a_forked_command_prints_and_exits_as_a_fresh_interpreter(tmp_path, monkeypatch, module, args, code):
    args = [*args, f"hydra.run.dir={tmp_path}/run"] if args != ["--help"] else args
    monkeypatch.delenv("FINETUNE_TEST_CLI", raising=False)
    forked = run_cli(args, module=module, check=False, cwd=tmp_path)
    monkeypatch.setenv("FINETUNE_TEST_CLI", "subprocess")
    fresh = run_cli(args, module=module, check=False, cwd=tmp_path)
    assert forked.returncode == fresh.returncode == code
    assert forked.stdout == fresh.stdout and forked.stderr == fresh.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_child_gets_the_working_folder_and_environment_it_is_given(tmp_path, monkeypatch):
    """``python -m`` puts the working folder first on ``sys.path``: a module there runs, and sees the env given."""
    (tmp_path / "probe_module.py").write_text(
        "import os, sys\nprint(os.getcwd(), os.environ['PROBE'], sys.argv[1:])\nsys.exit(3)\n"
    )
    monkeypatch.delenv("FINETUNE_TEST_CLI", raising=False)
    env = {**cli_env(), "PROBE": "seen"}
    done = run_cli(["a", "b"], module="probe_module", check=False, cwd=tmp_path, env=env)
    assert (done.returncode, done.stdout) == (3, f"{tmp_path} seen ['a', 'b']\n")
