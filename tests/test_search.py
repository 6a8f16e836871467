"""hparams_search=...: an Optuna study through Hydra's sweeper interface, validation only, continued by a rerun."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from finetune.errors import SettingError
from finetune.harness.overrides import sweep_params_from_argv

from .conftest import CONF_DIR, compose_with_hydra, make_image_folder, run_cli

optuna = pytest.importorskip("optuna")

# Hydra's plugin scan re-executes this module in place (exec_module on the module in sys.modules), which makes new
# classes: look them up at call time, through the module, never bind them at import.
import hydra_plugins.finetune_optuna_sweeper.optuna_sweeper as plugin  # noqa: E402


def test_the_search_space_comes_from_params_and_the_command_line():
    sweeper = plugin.OptunaSweeper(params={"optimizer.lr": "tag(log, interval(1e-4, 1e-1))"}, folds=3)
    space, fixed = sweeper.split_arguments(
        ["model.head_lr_mult=choice(1,10)", "trainer.max_epochs=range(2,8,2)", "seed=1"]
    )
    assert space == {
        "optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "model.head_lr_mult": optuna.distributions.CategoricalDistribution([1, 10]),
        "trainer.max_epochs": optuna.distributions.IntDistribution(2, 6, step=2),
    }
    assert fixed == ["seed=1"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["test_after_fit=true"], "never compute a test metric"),
        (["test_after_fit=true,false"], "never compute a test metric"),
        (["data.fold=1"], "data.fold is set by hydra.sweeper.folds=3"),
        (["seed=1"], "nothing to search"),
    ],
)
def test_a_search_that_would_test_or_clash_with_its_folds_is_refused(arguments, message):
    params = {} if arguments == ["seed=1"] else {"optimizer.lr": "interval(0.001, 0.1)"}
    with pytest.raises(plugin.SearchError, match=message):
        plugin.OptunaSweeper(params=params, folds=3).split_arguments(arguments)


def test_bad_sweeper_settings_name_the_setting():
    with pytest.raises(plugin.SearchError, match="hydra.sweeper.folds must be null or an integer >= 2"):
        plugin.OptunaSweeper(folds=1)
    with pytest.raises(plugin.SearchError, match="hydra.sweeper.direction must be maximize or minimize"):
        plugin.OptunaSweeper(direction="up")


def _search(tmp_path: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        "-m", "hparams_search=finetune",
        "data=folder", f"data.root={data}", "data.image_size=32", "data.resize_size=36", "data.batch_size=4",
        "data.num_workers=0", "model.weights=null", "model.backbone=mobilenet_v3_small", "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0", "hydra.sweeper.folds=2", "hydra.sweeper.study_name=tiny",
        f"paths.log_dir={tmp_path / 'logs'}", *extra,
    ]  # fmt: skip
    return run_cli(overrides, timeout=1200, check=False)


@pytest.mark.slow
def test_a_search_runs_resumes_and_never_tests(tmp_path, tiny_folder):
    first = _search(tmp_path, tiny_folder, "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "logs" / "searches" / "tiny"
    storage = f"sqlite:///{folder / 'optuna.db'}"
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 3

    second = _search(tmp_path, tiny_folder, "hydra.sweeper.n_trials=5")  # the same command, continued
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 5  # the continued study drew new points

    jobs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    ran = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(jobs) == sum(len([k for k in t.user_attrs if k.startswith("job_")]) for t in trials)
    assert [int(p.name.split("_")[0]) for p in jobs] == list(range(len(jobs)))  # numbered on, none reused
    values = {}
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed" and results["test_after_fit"] is False
        assert results["test/acc"] is None and results["test/loss"] is None  # never tested
        assert not any(
            c.startswith("test/") for c in (job / "csv" / "metrics.csv").read_text().split("\n")[0].split(",")
        )
        assert results["folds"] == 2 and results["fold"] in (0, 1)
        values[int(job.name.split("_")[0])] = results["val/acc"]
    for trial in ran:  # a trial's value is the mean of its folds' best val/acc
        folds = [values[trial.user_attrs[f"job_{fold}"]] for fold in (0, 1)]
        assert trial.value == pytest.approx(sum(folds) / 2)
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["trials"] == 5 and best["best_value"] == pytest.approx(study.best_value)
    assert best["overrides"][0] == "hparams_search=finetune"  # the preset's fixed settings come with it
    assert not any(o.startswith(("test_after_fit=", "hydra.", "data.fold")) for o in best["overrides"])

    refused = _search(tmp_path, tiny_folder, "hydra.sweeper.n_trials=6", "test_after_fit=true")
    assert refused.returncode == 2 and "never compute a test metric" in refused.stderr
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 5  # nothing ran


class FakeJob:
    def __init__(self, value, working_dir: str) -> None:
        self._value, self.working_dir = value, working_dir

    @property
    def return_value(self):
        if isinstance(self._value, Exception):
            raise self._value
        return self._value


class FakeLauncher:
    """Returns, for each job, the value ``score(overrides)``; records what was launched."""

    def __init__(self, score) -> None:
        self.score, self.launched = score, []

    def launch(self, batch, initial_job_idx):
        self.launched += [(initial_job_idx + i, list(job)) for i, job in enumerate(batch)]
        return [FakeJob(self.score(job), f"job{initial_job_idx + i}") for i, job in enumerate(batch)]


def _fold_search(score, trials: int = 4):
    sweeper = plugin.OptunaSweeper(params={"optimizer.lr": "interval(0.001, 0.1)"}, folds=3, n_trials=trials)
    sweeper.launcher = FakeLauncher(score)
    sweeper.check_no_test = sweeper.validate_batch_is_legal = lambda batch: None  # no Hydra app here
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    space, fixed = sweeper.split_arguments(["seed=0"])
    for _ in range(trials):
        sweeper.run_trials(study, [study.ask(space)], fixed)
    return study, sweeper.launcher.launched


def test_a_trial_is_the_mean_over_its_folds_and_a_hopeless_one_is_pruned_after_a_fold():
    scores = iter([0.9, 0.8, 0.7, 0.6, 0.6, 0.6, 0.1, 0.2, 0.8, 0.9, 0.5])  # in launch order

    study, launched = _fold_search(lambda job: next(scores))
    states = [t.state for t in study.trials]
    assert [t.value for t in study.trials[:2]] == [pytest.approx(0.8), pytest.approx(0.6)]
    assert states[2] == optuna.trial.TrialState.PRUNED  # 0.1 after fold 0, below the median of 0.9 and 0.6
    folds_of = [[o for o in job if o.startswith("data.fold=")][0] for _, job in launched]
    assert folds_of[:7] == ["data.fold=0", "data.fold=1", "data.fold=2"] * 2 + ["data.fold=0"]
    assert [number for number, _ in launched] == list(range(len(launched)))  # job folders numbered on
    assert all("data.folds=3" in job and "seed=0" in job for _, job in launched)


def test_a_failed_job_fails_its_trial_and_the_search_goes_on():
    values = iter([0.9, RuntimeError("out of memory"), 0.8, 0.8, 0.8, 0.8])
    study, launched = _fold_search(lambda job: next(values), trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert len(launched) == 2 + 3  # the failed trial stops at its failing fold


SEARCHES = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("name", SEARCHES)
def test_every_search_config_is_validation_only_and_persists_its_study(name):
    cfg = compose_with_hydra([f"hparams_search={name}"])
    HydraConfig.instance().set_config(cfg)  # for ${name} in a study name
    assert cfg.test_after_fit is False
    assert cfg.hydra.sweeper.folds >= 2 and cfg.hydra.sweeper.params
    assert cfg.hydra.sweep.dir.endswith(f"searches/{cfg.hydra.sweeper.study_name}")
    plugin.OptunaSweeper(**{k: v for k, v in cfg.hydra.sweeper.items() if k != "_target_"}).split_arguments([])


def test_the_probe_search_trains_only_the_head_on_cached_features():
    cfg = compose_with_hydra(["hparams_search=probe"])
    assert cfg.hydra.runtime.choices.experiment == "frozen"
    assert cfg.model.freeze == "backbone" and cfg.features is not None and cfg.data.augmentation is None
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "trainer.max_epochs"}


# --- best.yaml, a study's record of its space and data, hydra.sweeper.params.<key>= on the command line ------------


def test_a_plain_value_on_the_command_line_fixes_a_key_that_params_searches():
    sweeper = plugin.OptunaSweeper(params={"optimizer.lr": "interval(0.001, 0.1)", "seed": "choice(0,1)"})
    space, fixed = sweeper.split_arguments(["optimizer.lr=0.01", "seed=choice(2,3)"])
    assert space == {"seed": optuna.distributions.CategoricalDistribution([2, 3])}  # the command line's sweep wins
    assert fixed == ["optimizer.lr=0.01"]


@pytest.mark.parametrize(
    ("given", "becomes"),
    [
        (
            "hydra.sweeper.params.optimizer.lr=tag(log, interval(1e-4, 1e-2))",
            "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
        ),
        ("hydra.sweeper.params.optimizer.lr='interval(1e-4, 1e-2)'", "optimizer.lr=interval(1e-4, 1e-2)"),
        ('+hydra.sweeper.params.seed="choice(1,2)"', "seed=choice(1,2)"),
        ("hydra.sweeper.params.trainer.max_epochs=5", "trainer.max_epochs=5"),
        ("hydra.sweeper.folds=3", "hydra.sweeper.folds=3"),
    ],
)
def test_sweeper_params_on_the_command_line_become_sweep_overrides(given, becomes):
    argv = ["train.py", "-m", "hparams_search=probe", given, "seed=0"]
    assert sweep_params_from_argv(argv) == ["train.py", "-m", "hparams_search=probe", becomes, "seed=0"]


def test_removing_a_sweeper_param_on_the_command_line_says_what_to_do():
    with pytest.raises(SettingError, match=r"to stop searching optimizer.lr, give it one value instead"):
        sweep_params_from_argv(["train.py", "-m", "~hydra.sweeper.params.optimizer.lr"])


def _record(space: dict[str, str], root: str = "/data/a", folds: int = 5) -> tuple[dict, dict]:
    sweeper = plugin.OptunaSweeper(params=space, folds=folds)
    cfg = OmegaConf.create({"data": {"root": root, "split_seed": 0, "val_fraction": 0.1}})
    return plugin.space_record(sweeper.split_arguments([])[0]), plugin.search_data(cfg, folds)


def test_a_study_records_its_space_and_data_and_refuses_either_changed_by_setting():
    study = optuna.create_study(study_name="probe", direction="maximize")
    space, data = _record({"optimizer.lr": "interval(0.001, 0.1)"})
    plugin.check_same_study(study, space, data)
    assert study.user_attrs[plugin.SPACE_ATTR] == space and study.user_attrs[plugin.DATA_ATTR]["data.root"] == "/data/a"
    study.enqueue_trial({"optimizer.lr": 0.01})
    study.optimize(lambda trial: trial.suggest_float("optimizer.lr", 0.001, 0.1), n_trials=1)

    plugin.check_same_study(study, space, data)  # the same search goes on
    with pytest.raises(
        plugin.SearchError,
        match=r"another search space \(optimizer.lr: FloatDistribution\(.*high=0.1.*"
        r"in the study, FloatDistribution\(.*high=0.5.* now\).*hydra.sweeper.study_name=NEW",
    ):
        plugin.check_same_study(study, _record({"optimizer.lr": "interval(0.001, 0.5)"})[0], data)
    with pytest.raises(plugin.SearchError, match=r"another search space \(seed: not searched in the study"):
        plugin.check_same_study(
            study, _record({"optimizer.lr": "interval(0.001, 0.1)", "seed": "choice(0,1)"})[0], data
        )
    with pytest.raises(plugin.SearchError, match=r"on other data \(data.root: '/data/a' in the study, '/data/b' now\)"):
        plugin.check_same_study(study, space, _record({"optimizer.lr": "interval(0.001, 0.1)"}, root="/data/b")[1])
    with pytest.raises(plugin.SearchError, match=r"hydra.sweeper.folds: 5 in the study, 3 now"):
        plugin.check_same_study(study, space, _record({"optimizer.lr": "interval(0.001, 0.1)"}, folds=3)[1])
    assert study.user_attrs[plugin.SPACE_ATTR] == space  # a refused invocation changes nothing


def _probe_search(tmp_path: Path, data: Path, *extra: str, study: str = "tiny_probe") -> subprocess.CompletedProcess:
    overrides = [
        "-m", "hparams_search=probe",
        "data=folder", f"data.root={data}", "data.image_size=32", "data.resize_size=36", "data.batch_size=4",
        "data.num_workers=0", "model.weights=null", "model.backbone=mobilenet_v3_small", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0",
        "hydra.sweeper.folds=2", f"hydra.sweeper.study_name={study}", f"paths.log_dir={tmp_path / 'logs'}",
        "hydra.sweeper.params.trainer.max_epochs=choice(1,2)",  # on the command line, as Hydra's users write it
        "hydra.sweeper.params.optimizer.lr='tag(log, interval(1e-3, 1e-2))'",  # quoted, as Hydra would need it
        *extra,
    ]  # fmt: skip
    return run_cli(overrides, timeout=1200, check=False)


def _job_config(folder: Path, job: int) -> dict:
    (run,) = folder.glob(f"{job}_*")
    return OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"))


@pytest.mark.slow
def test_best_yaml_composes_exactly_the_best_trials_config_of_a_probe_search(tmp_path, tiny_folder):
    done = _probe_search(tmp_path, tiny_folder, "hydra.sweeper.n_trials=2")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "logs" / "searches" / "tiny_probe"
    study = optuna.load_study(study_name="tiny_probe", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert all(t.params["trainer.max_epochs"] in (1, 2) for t in study.trials)  # the command line's params searched
    assert all(1e-3 <= t.params["optimizer.lr"] <= 1e-2 for t in study.trials)
    assert set(study.best_trial.params) == {"optimizer.lr", "optimizer.weight_decay", "trainer.max_epochs"}

    best = _assert_best_yaml_composes_the_best_trial(folder, study)
    composed = compose_with_hydra(best["overrides"])
    assert composed.hydra.runtime.choices.experiment == "frozen"  # the searched head on cached features, not a
    assert composed.model.freeze == "backbone" and composed.features is not None  # full fine-tune
    assert shlex.split(best["test_command"]) == [
        "python", "-m", "finetune.train", *best["overrides"], "test_after_fit=true"
    ]  # fmt: skip


def _assert_best_yaml_composes_the_best_trial(folder: Path, study) -> dict:
    """best.yaml's overrides compose the config of each of the best trial's jobs, less its fold selection."""
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["best_trial"] == study.best_trial.number
    task = OmegaConf.to_container(compose_with_hydra(best["overrides"]))
    del task["hydra"]
    for fold in (0, 1):  # each fold's job ran this config, with its fold selected
        job = _job_config(folder, study.best_trial.user_attrs[f"job_{fold}"])
        assert (job["data"]["folds"], job["data"]["fold"]) == (2, fold)
        job["data"]["folds"] = job["data"]["fold"] = None
        assert task == job
    return best


@pytest.mark.slow
def test_a_study_refuses_other_data_or_another_space_by_name_and_continues_unchanged(tmp_path, tiny_folder):
    first = _probe_search(tmp_path, tiny_folder, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "logs" / "searches" / "tiny_probe"
    storage = f"sqlite:///{folder / 'optuna.db'}"

    other = make_image_folder(tmp_path / "other", seed=1)
    refused = _probe_search(tmp_path, other, "hydra.sweeper.n_trials=2")
    assert refused.returncode == 2
    assert f"data.root: '{tiny_folder.resolve()}' in the study, '{other.resolve()}' now" in refused.stderr
    assert "hydra.sweeper.study_name=NEW" in refused.stderr
    refused = _probe_search(tmp_path, tiny_folder, "hydra.sweeper.n_trials=2", "trainer.max_epochs=choice(1,3)")
    assert refused.returncode == 2
    assert (
        "another search space (trainer.max_epochs: CategoricalDistribution(choices=(1, 2)) in the study, "
        "CategoricalDistribution(choices=(1, 3)) now)" in refused.stderr
    )
    assert len(optuna.load_study(study_name="tiny_probe", storage=storage).trials) == 1  # nothing ran
    assert OmegaConf.load(folder / "multirun.yaml").data.root == str(tiny_folder)  # nor was the record rewritten
    assert sorted(p.name.split("_")[0] for p in folder.iterdir() if p.is_dir()) == ["0", "1"]

    renamed = _probe_search(tmp_path, other, "hydra.sweeper.n_trials=1", study="tiny_probe_other")
    assert renamed.returncode == 0, renamed.stderr[-3000:]  # a new study name: a new study on the other data
    # The same space and data: continued, though a setting outside the data changed (not part of the study's record)
    again = _probe_search(tmp_path, tiny_folder, "hydra.sweeper.n_trials=2", "data.batch_size=2")
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="tiny_probe", storage=storage)
    assert len(study.trials) == 2
    best = _assert_best_yaml_composes_the_best_trial(folder, study)  # whichever trial won, with its own settings
    assert ("data.batch_size=2" in best["overrides"]) == (study.best_trial.number == 1)
