"""results.json records what produced it: package versions and the code's git commit."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess

import torch
import torchvision

from finetune.harness.results import environment, git_state
from finetune.train import train

from .conftest import REPO, compose_config, tiny_overrides


def _git(folder, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_gives_the_commit_and_whether_tracked_files_changed(tmp_path):
    assert git_state(tmp_path) is None  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "untracked.txt").write_text("not part of the code")
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.txt").write_text("two")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}


def test_results_json_records_the_versions_that_produced_it(tmp_path, tiny_folder):
    train(compose_config(["trainer.fast_dev_run=true"] + tiny_overrides(tiny_folder, tmp_path)))
    recorded = json.loads((tmp_path / "results.json").read_text())["environment"]
    assert recorded["versions"]["torch"] == importlib.metadata.version("torch") == torch.__version__.split("+")[0]
    assert recorded["versions"]["torchvision"] == torchvision.__version__.split("+")[0]
    assert recorded == json.loads(json.dumps(environment()))  # the same code, the same record


def test_environment_finds_this_checkouts_commit():
    head = _git(REPO, "rev-parse", "HEAD")
    assert environment()["git"]["commit"] == head  # the checkout above src/finetune/harness/, not src/
