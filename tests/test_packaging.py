"""A non-editable install (a built wheel in a fresh venv), run from another folder, finds its shipped configs."""

import ast
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

# Every experiment config, as the help lists them (a new one must show up there).
EXPERIMENTS = ", ".join(sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))

pytestmark = pytest.mark.slow

# What a checkout holds that a build must not see (or that is large): top-level run folders, build leftovers.
_TOP_LEVEL = {".git", "data", "logs", "outputs", "multirun", "build", "dist", ".venv"}
_ANYWHERE = shutil.ignore_patterns("*.egg-info", "__pycache__", ".*cache")


def _not_source(folder: str, names: list[str]) -> set[str]:
    ignored = set(_ANYWHERE(folder, names))
    return ignored | (_TOP_LEVEL & set(names)) if Path(folder) == REPO else ignored


def _run(args: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip wheel`` a copy of the checkout, install the wheel into a new venv; the venv's bin folder."""
    root = tmp_path_factory.mktemp("packaging")
    source, wheels, venv = root / "source", root / "wheels", root / "venv"
    shutil.copytree(REPO, source, symlinks=True, ignore=_not_source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # No build isolation: the build uses this environment's setuptools instead of downloading one.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], root, env)
    (wheel,) = wheels.glob("finetune-*.whl")

    # A fresh venv that sees this environment's packages (torch, Lightning, ...) but not its finetune: a .pth line
    # adds the site-packages folder without running the .pth files in it (such as an editable finetune's).
    _run([sys.executable, "-m", "venv", venv], root, env)
    python = venv / "bin" / "python"
    venv_site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root, env).stdout.strip()
    )
    (venv_site / "_outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], root, env)
    return {"bin": venv / "bin", "python": python, "site": venv_site, "wheel": wheel, "env": env}


def test_wheel_ships_every_config_as_package_data(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped = {name.removeprefix("finetune/conf/") for name in names if name.startswith("finetune/conf/")}
    in_checkout = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == in_checkout
    assert not any(name.startswith(("conf/", "tests/", "scripts/")) for name in names)


def test_installed_package_uses_its_own_configs(installed, tmp_path):
    where = _run(
        [
            installed["python"],
            "-c",
            "import finetune, finetune.run as r; print(finetune.__file__); print(r.CONFIG_DIR)",
        ],
        tmp_path,
        installed["env"],
    ).stdout.split()
    package_file, config_dir = (Path(line) for line in where[-2:])
    assert package_file.is_relative_to(installed["site"]), "the wheel's finetune, not a checkout's"
    assert config_dir == installed["site"] / "finetune" / "conf" and not config_dir.is_symlink()


def test_console_scripts_compose_help_and_run_from_another_folder(installed, tmp_path, tiny_folder):
    env, train = installed["env"], installed["bin"] / "finetune-train"
    job = _run([train, "--cfg", "job", "model.backbone=resnet50", "+logger=tensorboard"], tmp_path, env).stdout
    assert "backbone: resnet50" in job and "sha1: fba480ffa8aa7e0febbb511d181409f899b9baa5" in job
    assert "tensorboard:" in job and "csv:" in job
    help_text = _run([train, "--help"], tmp_path, env).stdout
    assert f"experiment: {EXPERIMENTS}" in help_text and "debug=fdr" in help_text
    evaluate = _run([installed["bin"] / "finetune-eval", "--cfg", "job", "ckpt_path=x.ckpt"], tmp_path, env).stdout
    assert "ckpt_path: x.ckpt" in evaluate and "name: eval" in evaluate

    # A real (one-batch) run: the shipped configs compose, the run writes into the working folder's logs/.
    run = _run(
        [
            train,
            "debug=fdr",
            "data=folder",
            f"data.root={tiny_folder}",
            "data.image_size=32",
            "data.resize_size=36",
            "data.batch_size=4",
            "model.weights=null",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
        env,
    )
    results = list((tmp_path / "logs" / "runs").glob("*_finetune/results.json"))
    assert len(results) == 1, run.stdout[-2000:]
    assert '"status": "completed"' in results[0].read_text()


def test_every_imported_third_party_package_is_declared():
    """Each top-level import in src/ and scripts/ is the standard library, finetune, or a declared distribution."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    declared = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    # import name -> distribution where they differ (lightning_fabric ships inside the pytorch-lightning wheel)
    distribution = {"PIL": "pillow", "yaml": "pyyaml", "hydra": "hydra-core", "lightning_fabric": "pytorch-lightning"}
    imported = set()
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    first_party = {"finetune", "hydra_plugins", *(p.stem for p in (REPO / "scripts").glob("*.py"))}  # a script's helper
    third_party = {n for n in imported if n not in sys.stdlib_module_names and n not in first_party}
    assert {"torch", "numpy", "PIL", "rich", "timm"} <= third_party  # the scan sees imports at all
    missing = sorted(n for n in third_party if distribution.get(n, n).lower().replace("_", "-") not in declared)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
