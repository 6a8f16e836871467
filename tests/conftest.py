"""Shared test helpers: tiny generated image folders, Hydra composition, the train CLI in a subprocess, an
independent count of correct predictions, and the real data in ../shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from PIL import Image

from finetune.run import compose_config  # noqa: F401 - the tests compose through conftest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED = REPO.parent / "shared"
KAGGLE_HOTDOG = SHARED / "data" / "hotdog-kaggle"
MOBILENET_V2_WEIGHTS = SHARED / "weights" / "mobilenet_v2-imagenet-features.pth"
EFFICIENTNET_LITE2_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite2-imagenet.pth"  # with its ImageNet head

# One thread per test process, in this one and (through OMP_NUM_THREADS, which they inherit) in every process a test
# starts, unless OMP_NUM_THREADS says otherwise. The runs are tiny; extra OpenMP threads only wait for a core on a
# small or busy machine, and waiting threads spin: on a shared 2-core machine the in-process resume test took
# 90-130 s with torch's default of 2 threads and 13 s with 1.
THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
torch.set_num_threads(THREADS)


def _checkout_outputs() -> set[str]:
    return {str(p) for name in ("logs", "outputs", "multirun") for p in (REPO / name).glob("*/*")}


@pytest.fixture(scope="session", autouse=True)
def _no_test_writes_into_the_checkout():
    """A command a test starts without ``hydra.run.dir`` (or ``paths.log_dir``) under ``tmp_path`` writes its run
    folder into the checkout's ``logs/``: fail the session that did it."""
    before = _checkout_outputs()
    yield
    new = sorted(_checkout_outputs() - before)
    assert not new, f"tests wrote run folders into the checkout: {new} (give the command hydra.run.dir= in tmp_path)"


def make_image_folder(root: Path, classes=("cat", "dog"), n_train: int = 10, n_test: int = 4, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/*.png``: noise images whose mean colour depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 128, size=(36 + i % 5, 40, 3), dtype=np.uint8)
                pixels[..., index % 3] += 120
                Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


def tiny_overrides(root: Path, output_dir: Path) -> list[str]:
    """Overrides that make any experiment run in seconds on the CPU."""
    return [
        "data=folder",
        f"data.root={root}",
        "data.image_size=32",
        "data.resize_size=36",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_fraction=0.2",
        "model.weights=null",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0",
        f"paths.output_dir={output_dir}",
        f"paths.log_dir={output_dir}/logs",
    ]


def compose_with_hydra(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The composed config with its ``hydra`` node (launcher, sweep and run settings), as Hydra's CLI sees it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def needs_shared(*paths: Path):
    missing = [str(p) for p in paths if not p.exists()]
    return pytest.mark.skipif(bool(missing), reason=f"real data/weights not found: {', '.join(missing)}")


# --- the train command in a subprocess -----------------------------------------------------------------------------

# Variables a subprocess must not inherit: those that would make Lightning or torch.distributed join a job that is
# not the test's (a test session inside a SLURM allocation or a torchrun rank must still start plain, single-machine
# runs), and Lightning's PL_GLOBAL_SEED / PL_SEED_WORKERS, which an earlier in-process run leaves in os.environ.
_FOREIGN_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PL_", "LIGHTNING_")
_FOREIGN_ENV = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
}


def cli_env() -> dict[str, str]:
    """The environment for ``python -m finetune.train`` in a subprocess.

    This checkout's ``src`` comes first on ``PYTHONPATH`` (not whatever ``pip install -e`` points at) and the
    repository root next, so that ``_target_=tests.conftest...`` callbacks import; warnings are quiet, ``THREADS``
    OpenMP threads, and no inherited cluster or rank variables.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _FOREIGN_ENV and not key.startswith(_FOREIGN_ENV_PREFIXES)
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def cli_command(args: list[str], module: str = "finetune.train") -> list[str]:
    return [sys.executable, "-m", module, *args]


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_unprivileged(command: list[str]) -> list[str]:
    """``command`` as a user without root's override of file permissions: itself when the tests do not run as root,
    else run as ``nobody`` through ``setpriv``. Skips when that is impossible: no ``setpriv``, or an environment that
    ``nobody`` cannot read (a virtual environment inside a private folder imports nothing as another user)."""
    if os.geteuid() != 0:
        return command
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and no setpriv to run the command as another user")
    probe = subprocess.run(
        [*NOBODY, sys.executable, "-c", "import hydra, finetune"],
        env=cli_env(),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        pytest.skip(
            f"running as root, and user nobody cannot import this environment's packages ({sys.prefix} is not "
            "readable by others; make its folders world-readable to run this test)"
        )
    return [*NOBODY, *command]


_cli_server = None


def run_cli(
    args: list[str],
    timeout: float = 600,
    check: bool = True,
    module: str = "finetune.train",
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in ``cwd`` (the repository root), as ``subprocess.run`` with captured text output
    would run it; with ``check``, a failure shows its output.

    The command runs in a child forked from a server that has already imported torch and Lightning
    (``tests/cli_server.py``: a real process with its own pid, environment and exit status; ~7 s less per command).
    ``FINETUNE_TEST_CLI=subprocess`` starts a fresh interpreter instead.
    """
    global _cli_server
    command = cli_command(args, module)
    env = cli_env() if env is None else env
    if os.environ.get("FINETUNE_TEST_CLI") == "subprocess":
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        from tests.cli_server import CliServer

        if _cli_server is None:
            _cli_server = CliServer(REPO, cli_env())
        done = _cli_server.run(command, module, args, Path(cwd), env, timeout)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def start_cli(args: list[str], module: str = "finetune.train", **popen_kwargs) -> subprocess.Popen:
    """``python -m MODULE ARGS`` started in the background, stdout and stderr together as text."""
    popen_kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen_kwargs}
    return subprocess.Popen(cli_command(args, module), cwd=REPO, env=cli_env(), **popen_kwargs)


def without(overrides: list[str], *prefixes: str) -> list[str]:
    """``overrides`` less those whose key starts with one of ``prefixes`` (e.g. ``"paths.output_dir"``)."""
    return [o for o in overrides if not o.startswith(prefixes)]


# --- accuracy, counted independently of the module's metrics -------------------------------------------------------


class CountCorrect(pl.Callback):
    """Test-only: counts right predictions itself, so that a test can check the accuracy a run reports.

    A forward hook keeps the logits of each step; after every validation and test batch the callback compares
    their argmax with the batch's labels. ``path`` gets ``{"val": [[correct, total] per epoch], "test": [correct,
    total]}``; it may be an interpolation such as ``${paths.output_dir}/counts.json`` to follow each run's folder.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.counts: dict[str, list] = {"val": [], "test": None}
        self._logits = None
        self._handle = None
        self._running = [0, 0]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is None:
            self._handle = pl_module.register_forward_hook(self._keep)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _keep(self, module, inputs, output) -> None:
        self._logits = output.detach()

    def _count(self, batch) -> None:
        targets = batch[1]
        self._running[0] += int((self._logits.argmax(dim=-1) == targets).sum())
        self._running[1] += int(targets.numel())

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._running = [0, 0]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._count(batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.counts["val"].append(self._running)
            self._write()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._running = [0, 0]

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.counts["test"] = self._running
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.counts))


def count_correct(path: Path | str) -> list[str]:
    """Overrides that add :class:`CountCorrect`, writing to ``path``."""
    return [f"+callbacks.count_correct._target_={__name__}.CountCorrect", f"+callbacks.count_correct.path={path}"]


def assert_counted_accuracy(accuracy: float, counted: list[int], total: int) -> None:
    """``accuracy`` is the share of right predictions in ``counted`` = [correct, total], over ``total`` samples."""
    assert counted[1] == total, f"counted {counted[1]} samples, expected {total}"
    assert accuracy == pytest.approx(counted[0] / total, abs=1e-6), (accuracy, counted)
