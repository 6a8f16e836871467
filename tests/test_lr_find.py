"""finetune.lr_find: every parameter group moves together, the head at head_lr_mult times the backbone."""

from __future__ import annotations

import json
import logging
import math

import pytest

from finetune.lr_find import RangeTest, lr_find, range_test_config
from finetune.run import assemble

from .conftest import compose_config, tiny_overrides, without

STEPS = 12


def _find(tmp_path, data, *extra):
    overrides = ["model.backbone=mobilenet_v3_small", f"lr_find.num_training={STEPS}", "lr_find.min_lr=1e-5"]
    cfg = compose_config([*overrides, *extra] + tiny_overrides(data, tmp_path), config_name="lr_find")
    return lr_find(cfg)


@pytest.mark.parametrize(
    ("extra", "groups"),
    [
        pytest.param(
            ["+callbacks=[unfreeze,ema]", "callbacks.unfreeze.epoch=1"], {"backbone": 1, "head": 10}, id="finetune"
        ),
        pytest.param(["experiment=frozen"], {"head": 10}, id="frozen"),
        pytest.param(
            ["model.head_lr_mult=3", "lr_find.early_stop_threshold=null"], {"backbone": 1, "head": 3}, id="x3"
        ),
    ],
)
def test_every_group_keeps_its_ratio_at_every_step(tmp_path, tiny_folder, capsys, extra, groups):
    result = _find(tmp_path, tiny_folder, *extra)
    steps = result["steps"]
    assert 2 <= len(steps) <= STEPS
    ratio = (1.0 / 1e-5) ** (1 / (STEPS - 1))
    for index, step in enumerate(steps):
        assert step["step"] == index
        assert step["lr"] == pytest.approx(1e-5 * ratio**index, rel=1e-9)  # exponential from min_lr
        assert step["groups"].keys() == groups.keys()
        for name, scale in groups.items():  # the rate each group's optimizer step used
            assert step["groups"][name] == pytest.approx(step["lr"] * scale, rel=1e-12), (index, name)
        assert math.isfinite(step["loss"])
    if "lr_find.early_stop_threshold=null" in extra:
        assert len(steps) == STEPS
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["suggested_lr"] == result["suggested_lr"]
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if result["suggested_lr"] is not None:
        assert f"optimizer.lr={result['suggested_lr']:.3g}" in capsys.readouterr().out


def test_the_suggestion_is_the_steepest_descent_of_the_smoothed_loss():
    test = RangeTest(1e-4, 1.0, 5, None, beta=0.0)  # beta 0: no smoothing
    losses = [2.0, 1.9, 1.0, 0.9, 3.0]
    test.steps = [{"lr": test.base_lr(i), "loss": v, "smoothed": v} for i, v in enumerate(losses)]
    assert test.suggestion(skip_begin=0, skip_end=1) == pytest.approx(test.base_lr(1))  # between 1.9 and 1.0
    assert test.suggestion(skip_begin=3, skip_end=1) is None  # one point left


def test_bad_range_settings_name_the_setting():
    with pytest.raises(ValueError, match="lr_find.min_lr must be > 0 and below lr_find.max_lr"):
        RangeTest(1.0, 0.1, 10, 4.0)
    with pytest.raises(ValueError, match="lr_find.num_training must be at least 2"):
        RangeTest(1e-6, 1.0, 1, 4.0)


def test_progress_is_counted_in_steps_not_in_lightnings_epochs(tmp_path, tiny_folder, caplog):
    """A step-bounded test has no epoch count: Lightning's bar read "Epoch 1/-2"; the test's own counts steps."""
    overrides = [
        "model.backbone=mobilenet_v3_small",
        f"lr_find.num_training={STEPS}",
        "lr_find.early_stop_threshold=null",
    ]
    overrides += without(tiny_overrides(tiny_folder, tmp_path), "trainer.enable_progress_bar")  # the bar is on
    cfg = compose_config(overrides, config_name="lr_find")
    assert cfg.trainer.enable_progress_bar is True
    test = RangeTest(1e-5, 1.0, STEPS, None, progress_delay=0)
    run = assemble(range_test_config(cfg), [test])
    assert run.trainer.progress_bar_callback is None  # Lightning's epoch bar is off
    with caplog.at_level(logging.INFO, logger="finetune.progress"):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    lines = [record.getMessage() for record in caplog.records if record.name == "finetune.progress"]
    assert lines[0].startswith(f"lr_find: 1/{STEPS} steps (")
    assert lines[-1].startswith(f"lr_find: {STEPS}/{STEPS} steps (100.0%), done in ")
    assert not any("Epoch" in line for line in lines)
