"""Learning-rate range test: ``python -m finetune.lr_find [train overrides] [lr_find.num_training=100 ...]``.

Trains the configured run for ``lr_find.num_training`` steps while the learning rate grows exponentially from
``lr_find.min_lr`` to ``lr_find.max_lr``, and suggests the rate where the (smoothed) loss falls fastest. Every
parameter group moves together at its own ``lr_scale``: the head stays at ``model.head_lr_mult`` times the backbone
at every step. (Lightning's ``Tuner.lr_find`` gives every group one rate, and its callback writes that rate into
every group, so a head that trains at 10x would be tested at 1x.) The rate it suggests is ``optimizer.lr``, the
backbone's: it prints the override to paste, and writes ``lr_find.json`` and ``lr_find.png`` (matplotlib, the
optional ``figures`` extra) into its folder, ``logs/lr_find/<date>_<time>_<experiment>/``.

What it tests is the phase that trains every group: the callbacks (``unfreeze``, ``ema``, ``swa``, ...) and the
scheduler are left out, except those that decide which parameters train (``lora``, ``bitfit``), and nothing is
validated or checkpointed; ``features=cached`` is kept only where the backbone is frozen for good
(``model.freeze=backbone``). Under DDP the loss is averaged over the processes, so every process stops at the same
step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune import atomic
from finetune.errors import SettingError
from finetune.harness import distributed
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.results import write_json_atomic
from finetune.harness.run_settings import check_seed
from finetune.progress import DELAY, Reporter
from finetune.run import CONFIG_DIR, assemble, component

log = logging.getLogger(__name__)
FIGURE_NEEDS = "lr_find.png needs matplotlib: pip install 'finetune[figures]'"


class RangeTest(pl.Callback):
    """Sets every group's ``lr`` to ``base(step) * lr_scale`` before each step and records the loss.

    ``base`` grows exponentially from ``min_lr`` (step 0) to ``max_lr`` (step ``num_training - 1``); the test stops
    early once the smoothed loss exceeds ``early_stop_threshold`` times its lowest value (or is not finite).
    ``steps`` holds, per optimizer step, the base rate, every group's rate as the optimizer used it, and the loss.

    Progress is counted in steps, ``lr_find: 37/100 steps`` (:class:`~finetune.progress.Reporter`: a bar on a
    terminal, a log line every 30 s elsewhere) after ``progress_delay`` seconds, never with ``None``. Lightning's own
    bar counts epochs, which a test bounded by steps does not have (it read ``Epoch 1/-2``).
    """

    def __init__(
        self,
        min_lr: float,
        max_lr: float,
        num_training: int,
        early_stop_threshold: float | None,
        beta: float = 0.98,
        progress_delay: float | None = DELAY,
    ) -> None:
        if not 0 < min_lr < max_lr:
            raise SettingError(f"lr_find.min_lr must be > 0 and below lr_find.max_lr, got {min_lr} and {max_lr}.")
        if num_training < 2:
            raise SettingError(f"lr_find.num_training must be at least 2 steps, got {num_training}.")
        self.min_lr, self.max_lr, self.num_training = min_lr, max_lr, num_training
        self.early_stop_threshold, self.beta = early_stop_threshold, beta
        self.progress_delay = progress_delay
        self.steps: list[dict[str, Any]] = []
        self._average = 0.0
        self._best: float | None = None
        self._progress: Reporter | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.progress_delay is not None:
            self._progress = Reporter(self.num_training, "lr_find", unit="steps", delay=self.progress_delay)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_progress()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_progress()

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def base_lr(self, step: int) -> float:
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / (self.num_training - 1))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        base = self.base_lr(trainer.global_step)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = base * group.get("lr_scale", 1.0)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        groups = {str(g.get("name", i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        self.steps.append({"step": trainer.global_step, "lr": self.base_lr(trainer.global_step), "groups": groups})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, idx) -> None:
        if not self.steps or "loss" in self.steps[-1]:
            return  # an accumulation batch: no step was taken
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss = float(trainer.strategy.reduce(loss.detach(), reduce_op="mean"))  # the same on every process
        n = len(self.steps)
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smoothed = self._average / (1 - self.beta**n)
        self.steps[-1].update(loss=loss, smoothed=smoothed)
        if self._progress is not None:
            self._progress.advance()
        diverged = not math.isfinite(smoothed) or (
            self.early_stop_threshold is not None
            and self._best is not None
            and smoothed > self.early_stop_threshold * self._best
        )
        if math.isfinite(smoothed):
            self._best = smoothed if self._best is None else min(self._best, smoothed)
        if diverged or n >= self.num_training:
            trainer.should_stop = True

    def suggestion(self, skip_begin: int = 10, skip_end: int = 1) -> float | None:
        """The base rate where the smoothed loss falls fastest against log(lr) (as Lightning's, on the smoothed
        loss); ``None`` with fewer than 2 usable points."""
        points = [s for s in self.steps if "smoothed" in s][skip_begin : -skip_end or None]
        points = [s for s in points if math.isfinite(s["smoothed"])]
        if len(points) < 2:
            return None
        logs = [math.log(s["lr"]) for s in points]
        losses = [s["smoothed"] for s in points]
        slopes = []
        for i in range(len(points)):
            lo, hi = max(i - 1, 0), min(i + 1, len(points) - 1)
            slopes.append((losses[hi] - losses[lo]) / (logs[hi] - logs[lo]))
        return points[min(range(len(points)), key=slopes.__getitem__)]["lr"]


def range_test_config(cfg: DictConfig) -> DictConfig:
    """The train config with what a range test must not have: schedules, scheduler, validation, checkpoints."""
    cfg = cfg.copy()
    with open_dict(cfg):
        callbacks = cfg.get("callbacks") or {}
        kept = {name: node for name, node in callbacks.items() if node and _defines_trainable(node)}
        left_out = [
            name for name in callbacks if name not in kept and name not in ("model_checkpoint", "epoch_summary")
        ]
        if left_out:
            log.info("lr_find: callbacks %s left out: the test trains every group, unaveraged", ", ".join(left_out))
        if cfg.get("features") and cfg.model.get("freeze") != "backbone":
            cfg.features = None  # the cache served frozen epochs, which the test leaves out
        cfg.scheduler = None
        cfg.callbacks = kept or None
        cfg.logger = None
        cfg.trainer.max_epochs = -1
        cfg.trainer.max_steps = cfg.lr_find.num_training
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_model_summary = False  # the layer table says nothing about the rate
        cfg.trainer.enable_progress_bar = False  # RangeTest counts steps; Lightning's bar counts epochs (none here)
    return cfg


def _defines_trainable(node: DictConfig) -> bool:
    """A callback that decides which parameters train (``lora``, ``bitfit``: ``defines_trainable = True``): the
    range test keeps it, so that it tests the rate of what the run trains."""
    return bool(getattr(component("callbacks", node), "defines_trainable", False))


def lr_find(cfg: DictConfig) -> dict[str, Any]:
    """Run the range test of ``cfg``; write ``lr_find.json`` (and ``lr_find.png``) into ``cfg.paths.output_dir``."""
    pl.seed_everything(check_seed(cfg.seed), workers=True)
    settings = cfg.lr_find
    show = cfg.trainer.get("enable_progress_bar", True)
    test = RangeTest(
        settings.min_lr,
        settings.max_lr,
        settings.num_training,
        settings.early_stop_threshold,
        progress_delay=DELAY if show else None,
    )
    run = assemble(range_test_config(cfg), [test])
    run.trainer.fit(run.model, datamodule=run.datamodule)
    suggested = test.suggestion()
    result = {
        "suggested_lr": suggested,
        "override": None if suggested is None else f"optimizer.lr={suggested:.3g}",
        "head_lr_mult": cfg.model.head_lr_mult,
        "settings": OmegaConf.to_container(settings),
        "steps": test.steps,
    }
    if run.trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        write_json_atomic(out / "lr_find.json", result)
        figure = plot(test, suggested, out / "lr_find.png")
        if suggested is None:
            said = f"lr_find: no suggestion ({len(test.steps)} steps): raise lr_find.num_training or the data size"
        else:
            said = f"Suggested learning rate (the backbone's; the head at {cfg.model.head_lr_mult}x):"
            said += f"\n  {result['override']}"
        tell(f"{said}\n  {figure or FIGURE_NEEDS} ({out / 'lr_find.json'} holds every step)")
    return result


def plot(test: RangeTest, suggested: float | None, path: Path) -> Path | None:
    """Loss against the backbone's rate (log scale), the suggestion marked; ``None`` without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    points = [s for s in test.steps if "loss" in s]
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    ax.plot([s["lr"] for s in points], [s["loss"] for s in points], alpha=0.3, label="loss")
    ax.plot([s["lr"] for s in points], [s["smoothed"] for s in points], label="smoothed")
    if suggested is not None:
        ax.axvline(suggested, color="C3", linestyle="--", label=f"suggested optimizer.lr={suggested:.3g}")
    ax.set(xscale="log", xlabel="optimizer.lr (backbone; every group at its lr_scale)", ylabel="training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic.save_figure(figure, path, dpi=120)
    return path


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="lr_find")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    with distributed.job_scope(__spec__.name):  # DDP ranks 1.. run this module, not finetune.train
        lr_find(cfg)


if __name__ == "__main__":
    main()
