"""Configs mean what they say: every experiment x optimizer x scheduler composes to the tables of
docs/configuration.md ("What each experiment sets"), and every out-of-range model, optimizer or trainer setting stops
the run with a message naming it."""

import itertools
import json
import re

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from finetune.checks import check_optimizer
from finetune.errors import SettingError
from finetune.harness.run_settings import check_trainer_settings
from finetune.run import build_model
from finetune.train import train

from .conftest import REPO, compose_config, run_cli, tiny_overrides

EXPERIMENTS = ("finetune", "scratch", "frozen", "lpft")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("null", "cosine", "warmup", "warmup_cosine", "onecycle")
DOCUMENTED = REPO / "docs" / "configuration.md"
ABSENT = object()  # a "–" cell: the config does not set that key


def documented_tables(heading: str) -> dict[str, dict[str, dict[str, object]]]:
    """The Markdown tables under docs/configuration.md's ``## heading``: {first header: {row's value: {header: value}}}.

    Headers are their text without backticks. A cell's value is its first `backticked` token (the rest is
    commentary): ``null`` is None, numbers are floats, ``[a, b]`` is a list, ``–`` is ABSENT, else a string.
    """
    text = DOCUMENTED.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"{DOCUMENTED.name} has no '## {heading}' section"
    tables, rows = {}, []
    for line in match.group(1).splitlines() + [""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            header, _, *body = rows
            keys = [cell.replace("`", "") for cell in header]
            tables[keys[0]] = {_value(row[0]): dict(zip(keys[1:], map(_value, row[1:]), strict=True)) for row in body}
            rows = []
    return tables


def _value(cell: str) -> object:
    if cell.startswith("–"):
        return ABSENT
    token = re.search(r"`([^`]*)`", cell)
    text = token.group(1) if token else cell
    if text == "null":
        return None
    if text.startswith("["):
        return [float(x) for x in text.strip("[]").split(",")]
    try:
        return float(text)
    except ValueError:
        return text


TABLES = documented_tables("What each experiment sets")


def shipped(group: str) -> set[str]:
    """The options of a config group, as conf/ holds them."""
    return {path.stem for path in (REPO / "conf" / group).glob("*.yaml")}


def test_the_documented_tables_cover_every_shipped_option():
    """A new experiment, optimizer or scheduler config gets its row in docs/configuration.md."""
    assert set(TABLES) == {"experiment=", "optimizer=", "scheduler="}
    assert tuple(TABLES["experiment="]) == EXPERIMENTS and set(EXPERIMENTS) == shipped("experiment")
    assert tuple(TABLES["optimizer="]) == OPTIMIZERS and set(OPTIMIZERS) == shipped("optimizer")
    assert tuple(TABLES["scheduler="]) == (None, *SCHEDULERS[1:])  # the null row parses to None
    assert set(SCHEDULERS[1:]) == shipped("scheduler")


REFERENCES = ("pretrained_weights", "trainer.max_epochs", "optimizer.lr")  # cells naming a key mean its value


def _expected(cfg, cell):
    return OmegaConf.select(cfg, cell) if cell in REFERENCES else cell


def _check(node, key, cell, cfg):
    if cell is ABSENT:
        assert key not in node, f"{key} is set ({node.get(key)!r}), the docs say it is not"
    else:
        expected = _expected(cfg, cell)
        actual = OmegaConf.to_object(node[key]) if OmegaConf.is_config(node[key]) else node[key]
        assert actual == expected, f"{key}: composed {actual!r}, the docs say {expected!r}"


@pytest.mark.parametrize(
    "experiment, optimizer, scheduler", list(itertools.product(EXPERIMENTS, OPTIMIZERS, SCHEDULERS))
)
def test_every_combination_composes_to_the_documented_tables(experiment, optimizer, scheduler):
    choices = [f"experiment={experiment}", f"optimizer={optimizer}"]
    # scheduler=null is the default (Hydra refuses null as a group override).
    cfg = compose_config(choices + ([] if scheduler == "null" else [f"scheduler={scheduler}"]))
    exp, opt = TABLES["experiment="][experiment], TABLES["optimizer="][optimizer]
    sched = TABLES["scheduler="][None if scheduler == "null" else scheduler]

    assert cfg.name == experiment
    _check(cfg.model, "weights", exp["model.weights"], cfg)
    _check(cfg.model, "freeze", exp["model.freeze"], cfg)
    _check(cfg.model, "head_lr_mult", exp["model.head_lr_mult"], cfg)
    _check(cfg.optimizer, "lr", exp[f"optimizer.lr with optimizer={optimizer}"], cfg)
    assert cfg.optimizer._target_ == opt["class"]
    for key in ("weight_decay", "momentum", "betas"):
        _check(cfg.optimizer, key, opt[f"optimizer.{key}"], cfg)
    if sched["class"] is ABSENT:
        assert cfg.get("scheduler") is None
    else:
        assert cfg.scheduler.scheduler._target_ == sched["class"]
        assert cfg.scheduler.interval == sched["scheduler.interval"] and cfg.scheduler.frequency == 1
        for key in ("T_max", "start_factor", "total_iters", "warmup_fraction", "max_lr"):
            _check(cfg.scheduler.scheduler, key, sched[key], cfg)
    _check(cfg.trainer, "max_epochs", exp["trainer.max_epochs"], cfg)
    if exp["features"] is ABSENT:
        assert cfg.get("features") is None
    else:  # features=cached
        assert exp["features"] == "cached" and cfg.features._target_ == "finetune.features.FeatureCacheDataModule"
    _check(cfg.callbacks.get("unfreeze") or {}, "epoch", exp["callbacks.unfreeze.epoch"], cfg)
    # The book's batch comes from the data defaults, whatever the experiment.
    assert cfg.data.batch_size == 128


@pytest.mark.parametrize("experiment, optimizer", list(itertools.product(EXPERIMENTS, OPTIMIZERS)))
def test_the_built_optimizer_gets_the_tables_rates_head_included(experiment, optimizer):
    """What torch receives: the backbone at optimizer.lr, the head at lr x head_lr_mult, the optimizer's decay."""
    cfg = compose_config(
        [f"experiment={experiment}", f"optimizer={optimizer}", "scheduler=warmup", "model.weights=null"]
    )
    lr = TABLES["experiment="][experiment][f"optimizer.lr with optimizer={optimizer}"]
    mult = TABLES["experiment="][experiment]["model.head_lr_mult"]
    table = TABLES["optimizer="][optimizer]
    configured = build_model(cfg, num_classes=2).configure_optimizers()
    built = configured["optimizer"]
    assert type(built) is get_class(table["class"])
    rates = {group["name"]: group["lr"] for group in built.param_groups}
    expected = {
        "finetune": {"backbone": lr, "head": lr * mult},
        "scratch": {"backbone": lr, "head": lr},
        "frozen": {"head": lr * mult},
        "lpft": {"backbone": lr, "head": lr * mult},  # both groups from the start; the callback zeroes the backbone's
    }
    # LinearLR's first epoch multiplies every group by start_factor.
    start = TABLES["scheduler="]["warmup"]["start_factor"]
    assert rates == pytest.approx({name: rate * start for name, rate in expected[experiment].items()})
    for group in built.param_groups:
        assert group["weight_decay"] == table["optimizer.weight_decay"]
        if table["optimizer.momentum"] is not ABSENT:
            assert group["momentum"] == table["optimizer.momentum"]
        if table["optimizer.betas"] is not ABSENT:
            assert list(group["betas"]) == table["optimizer.betas"]


@pytest.mark.parametrize("experiment, optimizer", list(itertools.product(EXPERIMENTS, OPTIMIZERS)))
def test_optimizer_lr_on_the_command_line_wins(experiment, optimizer):
    cfg = compose_config([f"experiment={experiment}", f"optimizer={optimizer}", "optimizer.lr=0.5"])
    assert cfg.optimizer.lr == 0.5
    # ... and changes nothing else of the optimizer's.
    weight_decay = TABLES["optimizer="][optimizer]["optimizer.weight_decay"]
    assert cfg.optimizer.weight_decay == weight_decay


def test_an_experiment_rate_for_adamw_applies_to_adamw_only():
    """How an experiment declares its own AdamW rate (docs/configuration.md): experiment_lr.adamw; SGD keeps its own."""
    adamw = compose_config(["experiment=scratch", "optimizer=adamw", "+experiment_lr.adamw=3e-4"])
    sgd = compose_config(["experiment=scratch", "optimizer=sgd", "+experiment_lr.adamw=3e-4"])
    assert (adamw.optimizer.lr, sgd.optimizer.lr) == (3e-4, 6.4e-2)
    assert adamw.optimizer.weight_decay == 0.05


def test_cosine_spans_the_epochs_that_are_set():
    cfg = compose_config(["scheduler=cosine", "trainer.max_epochs=7"])
    assert cfg.scheduler.scheduler.T_max == 7


# --- out-of-range settings --------------------------------------------------------------------------------------
BAD_SETTINGS = [
    ("optimizer.lr=0", r"optimizer.lr must be > 0, got 0\. It is the backbone's learning rate"),
    ("optimizer.lr=-0.1", r"optimizer.lr must be > 0, got -0.1\."),
    ("optimizer.lr=fast", r"optimizer.lr must be > 0, got 'fast'\."),
    ("optimizer.lr=inf", r"optimizer.lr must be > 0, got inf\."),
    ("optimizer=adamw optimizer.lr=-1e-3", r"optimizer.lr must be > 0, got -0.001\."),
    ("optimizer.weight_decay=-1e-4", r"optimizer.weight_decay must be >= 0, got -0.0001\. Use 0 for no weight decay"),
    ("optimizer=adamw optimizer.weight_decay=-0.05", r"optimizer.weight_decay must be >= 0, got -0.05\."),
    ("optimizer.momentum=-0.5", r"optimizer.momentum must be in \[0, 1\), got -0.5\."),
    ("optimizer.momentum=1.0", r"optimizer.momentum must be in \[0, 1\), got 1.0\."),
    ("optimizer=adamw optimizer.betas=[0.9,1.0]", r"optimizer.betas must be two numbers in \[0, 1\), got \[0.9, 1.0\]"),
    ("optimizer=adamw optimizer.betas=[0.9]", r"optimizer.betas must be two numbers in \[0, 1\), got \[0.9\]"),
    ("model.head_lr_mult=0", r"model.head_lr_mult must be > 0, got 0\. It multiplies optimizer.lr for the new head"),
    ("model.head_lr_mult=-10", r"model.head_lr_mult must be > 0, got -10\."),
    ("model.head_lr_mult=nan", r"model.head_lr_mult must be > 0, got nan\."),
    ("model.freeze=layers", r"Unknown model.freeze='layers': choose one of \('none', 'backbone'\)"),
    ("model.freeze=null", r"Unknown model.freeze=None: choose one of"),
    ("trainer.max_epochs=0", r"trainer.max_epochs must be an integer >= 1 \(the epochs to train\), got 0\. Set e.g."),
    ("trainer.max_epochs=-1", r"trainer.max_epochs must be an integer >= 1 \(the epochs to train\), got -1\."),
    ("trainer.max_epochs=null", r"trainer.max_epochs must be an integer >= 1 \(the epochs to train\), got None\."),
    ("trainer.max_epochs=2.5", r"trainer.max_epochs must be an integer >= 1 \(the epochs to train\), got 2.5\."),
    ("+trainer.max_steps=0", r"trainer.max_steps must be -1 \(no step limit\) or an integer >= 1, got 0\. Leave it"),
    ("trainer.max_epochs=-1 +trainer.max_steps=-1", r"trainer.max_epochs must be an integer >= 1 .*, got -1\."),
    # Lightning skips clipping for a negative limit without a word, and fails on nan naming neither setting nor fix.
    ("trainer.gradient_clip_val=-1", r"trainer.gradient_clip_val must be a number >= 0 \(null or 0: no clipping\)"),
    ("trainer.gradient_clip_val=nan", r"trainer.gradient_clip_val must be a number >= 0 .*, got nan\."),
    ("+trainer.gradient_clip_algorithm=max", r"trainer.gradient_clip_algorithm must be one of norm, value, got 'max'"),
]


@pytest.mark.parametrize("overrides, message", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_an_out_of_range_setting_fails_the_run_naming_it(tmp_path, tiny_folder, overrides, message):
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path) + overrides.split())
    with pytest.raises(SettingError, match=message):
        train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["history"] == []
    assert re.search(message, results["error"])


@pytest.mark.parametrize(
    "settings",
    [
        {"lr": 1e-9, "weight_decay": 0, "momentum": 0},
        {"lr": 1, "weight_decay": 0.0, "momentum": 0.99},
        {"lr": 1e-4, "weight_decay": 0.05, "betas": (0.0, 0.999)},
        {},  # nothing passed: the optimizer's own defaults
    ],
)
def test_in_range_optimizer_settings_pass(settings):
    check_optimizer(settings)


@pytest.mark.parametrize(
    "trainer",
    [
        {"max_epochs": 1},
        {"max_epochs": 5, "max_steps": -1},
        {"max_epochs": -1, "max_steps": 3},  # what scripts/gpu_check.py runs: stopped by steps
        {"max_epochs": 2, "max_steps": 1},
        {"max_epochs": 1, "gradient_clip_val": 1.0, "gradient_clip_algorithm": "value"},
        {"max_epochs": 1, "gradient_clip_val": 0, "gradient_clip_algorithm": None},  # Lightning's "no clipping"
    ],
)
def test_runs_that_train_pass_the_trainer_check(trainer):
    check_trainer_settings(OmegaConf.create(trainer))


@pytest.mark.slow
def test_the_issues_command_prints_adamws_own_settings(tmp_path):
    """The trust issue's reproduction: `optimizer=adamw --cfg job` gave lr 6.4e-3 and weight decay 7.8e-6."""
    args = ["optimizer=adamw", "experiment=frozen", "--cfg", "job", "--resolve", "--package", "optimizer"]
    out = run_cli(args).stdout  # this checkout's code and conf/, not an installed one: the command as it was typed
    assert dict(re.findall(r"^(lr|weight_decay): (\S+)$", out, flags=re.M)) == {"lr": "0.0001", "weight_decay": "0.05"}
    for experiment in EXPERIMENTS:  # every experiment composes the same (in-process: a CLI start costs ~7 s)
        optimizer = compose_config(["optimizer=adamw", f"experiment={experiment}"]).optimizer
        assert (optimizer.lr, optimizer.weight_decay) == (1e-4, 0.05), experiment
