"""The private Lightning/torch names finetune relies on exist in the installed releases, and one module uses them.

``finetune.harness.private`` names the Lightning releases it was read and tested on (``CHECKED_LIGHTNING``); a
release outside them fails here first, so that a new Lightning is looked at before it is trusted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers import subprocess_script as pl_launcher
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector

from finetune.harness import private

PACKAGE = Path(private.__file__).resolve().parents[1]
# The research code: what a researcher opens to try a new loss, augmentation or backbone.
CORE = [
    "module.py", "backbones", "schedules.py", "checks.py", "metrics.py", "features.py", "errors.py", "data", "tta.py",
    "scoring.py", "temperature.py",
]  # fmt: skip


def test_the_installed_lightning_is_one_the_private_names_were_checked_on():
    assert private.lightning_is_checked(), (
        f"pytorch-lightning {pl.__version__} is not in CHECKED_LIGHTNING {private.CHECKED_LIGHTNING}: read "
        "finetune/harness/private.py against it, run the DDP and signal tests, then add it."
    )


def test_every_private_name_used_exists_in_the_installed_releases():
    assert hasattr(pl_launcher, "_hydra_subprocess_cmd") and hasattr(pl_launcher, "_launch_process_observer")
    assert callable(getattr(_SignalConnector, "_register_signal", None))
    assert hasattr(DDPStrategy(), "_timeout")
    net = torch.nn.Linear(2, 2)
    net.compile(backend="eager")
    assert net._compiled_call_impl is not None
    private.run_eagerly(net)
    assert net._compiled_call_impl is None
    assert private.COMPILE_ERRORS and issubclass(private.COMPILE_ERRORS[0], Exception)


def test_the_process_group_timeout_is_set_on_ddp_and_refused_elsewhere():
    ddp = DDPStrategy()
    assert private.set_process_group_timeout(ddp, 12.5)
    assert private.process_group_timeout(ddp).total_seconds() == 12.5
    assert not private.set_process_group_timeout(object(), 1.0)


def _python_files(names: list[str]) -> list[Path]:
    files = []
    for name in names:
        path = PACKAGE / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _imports(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
    return modules


def test_the_core_imports_neither_the_harness_nor_a_private_name():
    for path in _python_files(CORE):
        for module in _imports(path):
            assert not module.startswith("finetune.harness"), f"{path.name} imports {module}"
            private_part = any(part.startswith("_") and part != "__future__" for part in module.split("."))
            assert not private_part, f"{path.name} imports {module}"
        assert "._trainer" not in path.read_text(), path.name


def test_private_attributes_of_lightning_and_torch_are_reached_only_from_the_private_module():
    private_file = Path(private.__file__).resolve()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.resolve() == private_file:
            continue
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] in ("torch", "pytorch_lightning", "lightning_fabric"):
                assert not any(part.startswith("_") for part in parts), f"{path.name} imports {module}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                assert name not in ("trainer", "strategy", "torch", "pl", "net"), (
                    f"{path.relative_to(PACKAGE)}:{node.lineno} reaches {name}.{node.attr}"
                )
