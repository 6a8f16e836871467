"""A Hydra sweeper on current Optuna (>= 4): ``python -m finetune.train -m hparams_search=<name>``.

Why not the official ``hydra-optuna-sweeper``: its last release (1.3.0) pins ``optuna<3``, and that Optuna's SQLite
storage breaks with SQLAlchemy 2, so a study cannot be persisted and continued on a current stack. This plugin is
the part this project needs, on Optuna's ask-and-tell interface:

- the search space in Hydra's override grammar (``hydra.sweeper.params`` and sweep overrides on the command line):
  ``interval(a, b)`` (``tag(log, interval(a, b))`` for a log scale; integers give an integer range), ``choice(...)``
  or ``a,b,c``, ``range(a, b[, step])``; any other override is passed to every job as it is, and a plain value on
  the command line for a key that ``params`` searches fixes it instead. ``hydra.sweeper.params.<key>=<sweep>`` on
  the command line is the sweep override ``<key>=<sweep>`` (Hydra itself refuses a sweep inside ``hydra.``, and a
  dotted key such as ``optimizer.lr`` is not one node of ``params``):
  ``finetune.harness.overrides.sweep_params_from_argv`` rewrites it;
- the objective is what the task returns: ``finetune.train`` returns the best validation accuracy, and a search
  never tests (it refuses ``test_after_fit=true``);
- ``folds: K`` runs every trial on the K stratified folds (``data.folds=K data.fold=0..K-1``) and reports their
  mean; after each fold the running mean goes to the pruner (``pruner: median``), which stops hopeless trials early;
- the study lives in ``optuna.db`` (SQLite) in the sweep folder (``logs/searches/<study_name>/``), so running the
  same command again continues it: ``n_trials`` is the study's total, trials left running by a stopped invocation
  are marked failed, and job folders are numbered on from the last one, never reused;
- the study records its search space and its data (``data.root`` resolved, the split settings, the folds) in its
  user attributes, and a later invocation that changes either is refused, by setting, before it runs anything:
  trials of two searches, or of two datasets, would otherwise be ranked together;
- ``n_jobs`` trials are launched together (to use a parallel launcher); ``best.yaml`` in the sweep folder holds the
  best trial's value and the overrides that compose its config (the ``hparams_search`` preset included; its fold
  selection aside), and the command that trains that setting and tests it once.

This module imports nothing heavy at import time: Hydra imports every ``hydra_plugins`` module when any app starts
(without registering it in ``sys.modules``, hence no ``from __future__ import annotations`` for the dataclass).
"""

import logging
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional  # noqa: UP035 - OmegaConf 2.3 reads typing's forms in structured configs

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from finetune.errors import SettingError
from finetune.harness.exits import user_errors

log = logging.getLogger(__name__)

STUDY_DB = "optuna.db"  # finetune.harness.claim lets a search continue in a sweep folder that holds one
JOBS_ATTR = "jobs_launched"  # study user attribute: how many job folders the study's invocations have numbered
SPACE_ATTR = "search_space"  # study user attribute: {key: the Optuna distribution, as JSON} the study searches
DATA_ATTR = "data"  # study user attribute: what decides the trials' train and validation images (see search_data)
FIXED_ATTR = "fixed_overrides"  # trial user attribute: the overrides besides its values that its jobs ran with


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.finetune_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    study_name: str = "search"
    n_trials: int = 20  # the study's total: a later invocation runs only the trials still missing
    direction: str = "maximize"
    sampler: str = "tpe"  # tpe | random
    seed: int = 0
    folds: Optional[int] = None  # noqa: UP045 - K: every trial runs on K stratified folds and reports their mean
    pruner: str = "median"  # median | none (prunes between folds, so only with folds)
    n_jobs: int = 1  # trials launched together
    storage: Optional[str] = None  # noqa: UP045 - null: sqlite in the sweep folder
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(group="hydra/sweeper", name="finetune_optuna", node=OptunaSweeperConf, provider="finetune")


class SearchError(SettingError):
    """A search configuration that cannot run, worded for the user (a setting error: no traceback)."""


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = OptunaSweeperConf(**{k: v for k, v in settings.items() if k != "_target_"})
        s = self.settings
        if s.direction not in ("maximize", "minimize"):
            raise SearchError(f"hydra.sweeper.direction must be maximize or minimize, got {s.direction!r}.")
        if s.folds is not None and (isinstance(s.folds, bool) or not isinstance(s.folds, int) or s.folds < 2):
            raise SearchError(f"hydra.sweeper.folds must be null or an integer >= 2, got {s.folds!r}.")
        if s.n_trials < 1 or s.n_jobs < 1:
            raise SearchError(f"hydra.sweeper.n_trials and n_jobs must be >= 1, got {s.n_trials} and {s.n_jobs}.")
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # --- the search space -------------------------------------------------------------------------------------
    def split_arguments(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        """(Optuna distributions by override key, fixed overrides) from ``params`` and the command line."""
        import optuna.distributions as dist

        lines = [f"{k}={v}" for k, v in (self.settings.params or {}).items()] + list(arguments)
        space: dict[str, Any] = {}
        fixed: list[str] = []
        for override in OverridesParser.create().parse_overrides(lines):
            key = override.get_key_element()
            if override.key_or_group in ("data.fold", "data.folds") and self.settings.folds:
                raise SearchError(f"{key} is set by hydra.sweeper.folds={self.settings.folds}; leave it out.")
            if override.key_or_group == "test_after_fit":
                if not override.is_sweep_override() and str(override.value()).lower() == "false":
                    fixed.append(override.input_line)
                    continue
                raise SearchError(_NO_TEST.format(what=f"{override.input_line!r} in the search"))
            fixed = [f for f in fixed if _key_of(f) != key]  # the last override of a key wins, as in Hydra
            if not override.is_sweep_override():
                space.pop(key, None)  # a plain value fixes a key that params searches
                fixed.append(
                    override.input_line if override.is_delete() else f"{key}={override.get_value_element_as_str()}"
                )
                continue
            space[key] = _distribution(override, dist)
        if not space:
            raise SearchError("The search has nothing to search: give hydra.sweeper.params (or sweep overrides).")
        return space, fixed

    def check_no_test(self, overrides: list[str]) -> None:
        """The composed job config must not test: a search selects on validation only."""
        cfg = self.hydra_context.config_loader.load_sweep_config(master_config=self.config, sweep_overrides=overrides)
        if cfg.get("test_after_fit", True):
            raise SearchError(_NO_TEST.format(what="test_after_fit=true in the composed config"))

    # --- the study --------------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        with user_errors(job=False):  # a refused study or setting: one Error: line and exit code 2, as in the jobs
            return self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> Any:
        import optuna

        s = self.settings
        space, fixed = self.split_arguments(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_config = self.hydra_context.config_loader.load_sweep_config(
            master_config=self.config, sweep_overrides=fixed
        )
        storage = s.storage or f"sqlite:///{(sweep_dir / STUDY_DB).resolve()}"
        study = optuna.create_study(
            study_name=s.study_name, storage=storage, direction=s.direction, load_if_exists=True
        )
        check_same_study(study, space_record(space), search_data(job_config, s.folds))
        from finetune import atomic

        # after the check: a refused rerun leaves it as it was
        atomic.write_text(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            log.warning("Trial %d was left running by a stopped invocation: marked failed", trial.number)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        done = len(study.trials)
        sampler_seed = s.seed + done  # a continued study draws new points, not the first invocation's again
        study.sampler = (
            optuna.samplers.RandomSampler(seed=sampler_seed)
            if s.sampler == "random"
            else optuna.samplers.TPESampler(seed=sampler_seed)
        )
        median = s.pruner == "median"
        study.pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if median else optuna.pruners.NopPruner()
        log.info("Study %r in %s: %d trial(s) so far, running to %d", s.study_name, storage, done, s.n_trials)
        returns = []
        while done < s.n_trials:
            trials = [study.ask(space) for _ in range(min(s.n_jobs, s.n_trials - done))]
            returns.append(self.run_trials(study, trials, fixed))
            done = len(study.trials)
            self.write_best(study, sweep_dir, fixed)
        if done and not returns:
            log.info("Study %r already has %d trial(s) (n_trials=%d): nothing to run", s.study_name, done, s.n_trials)
            self.write_best(study, sweep_dir, fixed)
        return returns

    def run_trials(self, study, trials: list, fixed: list[str]) -> list:
        """Launch ``trials`` fold by fold; prune between folds; tell the study each trial's mean."""
        import optuna

        folds = self.settings.folds or 1
        values: dict[int, list[float]] = {t.number: [] for t in trials}
        alive = list(trials)
        results = []
        for fold in range(folds):
            if not alive:
                break  # every trial of the batch was pruned or failed
            fold_overrides = [f"data.folds={folds}", f"data.fold={fold}"] if self.settings.folds else []
            batch = [fixed + _trial_overrides(t) + fold_overrides for t in alive]
            self.check_no_test(batch[0])
            self.validate_batch_is_legal(batch)
            first = int(study.user_attrs.get(JOBS_ATTR, 0))
            study.set_user_attr(JOBS_ATTR, first + len(batch))
            launched = self.launcher.launch(batch, initial_job_idx=first)
            results.append(launched)
            for offset, (trial, job) in enumerate(zip(list(alive), launched, strict=True)):
                trial.set_user_attr(f"job_{fold}", first + offset)
                trial.set_user_attr(FIXED_ATTR, fixed)  # best.yaml's, should this trial win a later invocation
                value = _value(job)
                if value is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    alive.remove(trial)
                    continue
                values[trial.number].append(value)
                if fold + 1 < folds:
                    trial.report(sum(values[trial.number]) / len(values[trial.number]), step=fold)
                    if trial.should_prune():
                        log.info("Trial %d pruned after fold %d", trial.number, fold)
                        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                        alive.remove(trial)
        for trial in alive:
            mean = sum(values[trial.number]) / folds
            log.info("Trial %d: %s = %.4f over %d fold(s)", trial.number, "objective", mean, folds)
            study.tell(trial, mean)
        return results

    def write_best(self, study, sweep_dir: Path, fixed: list[str]) -> None:
        import optuna

        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            return
        best = study.best_trial  # its own overrides: a later invocation may have changed a setting outside the data
        overrides = best_overrides(best.user_attrs.get(FIXED_ATTR, fixed), best.params)
        record = {
            "study_name": self.settings.study_name,
            "trials": len(study.trials),
            "complete": len(complete),
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": dict(best.params),
            "objective": "mean validation score over folds" if self.settings.folds else "validation score",
            # python -m finetune.train <these>: the best trial's config (the preset included), less the fold it ran
            "overrides": overrides,
            "test_command": " ".join(["python -m finetune.train", *map(shlex.quote, overrides), "test_after_fit=true"]),
        }
        from finetune import atomic

        atomic.write_text(sweep_dir / "best.yaml", OmegaConf.to_yaml(OmegaConf.create(record)))


def best_overrides(fixed: list[str], params: dict[str, Any]) -> list[str]:
    """Overrides that compose a trial's config in a single run: the search's own (``hparams_search=`` included, whose
    fixed settings, such as probe's frozen head on cached features, the trial ran with) and the trial's values.

    Only the fold selection (``data.folds``/``data.fold``, one per job of the trial) is not among them; ``hydra.*``
    overrides, which never reach a task's config, are left out.
    """
    keys = set(params)
    kept = [o for o in fixed if not o.lstrip("+~").startswith("hydra.") and _key_of(o) not in keys]
    return kept + [f"{key}={_format(value)}" for key, value in params.items()]


def space_record(space: dict[str, Any]) -> dict[str, str]:
    """The search space as the study records it: ``{key: the distribution as Optuna's JSON}``."""
    import optuna.distributions as dist

    return {key: dist.distribution_to_json(value) for key, value in sorted(space.items())}


def search_data(cfg: DictConfig, folds: int | None) -> dict[str, Any]:
    """What decides a trial's train and validation images, from a job's composed config: the data config chosen,
    ``data.root`` resolved against the folder the search runs in (where the jobs run: ``hydra.job.chdir=false``),
    and the split (``data.split_seed``, then the folds, or ``data.val_fraction`` without folds)."""
    data = cfg.get("data") or {}
    root = OmegaConf.select(cfg, "data.root", default=None, throw_on_missing=False)
    record: dict[str, Any] = {
        "data": OmegaConf.select(cfg, "hydra.runtime.choices.data", default=None),
        "data.root": str(Path(str(root)).expanduser().resolve()) if root not in (None, "???") else None,
        "data.split_seed": data.get("split_seed"),
    }
    if folds:
        record["hydra.sweeper.folds"] = folds
    elif data.get("folds"):
        record.update({"data.folds": data.get("folds"), "data.fold": data.get("fold")})
    else:
        record["data.val_fraction"] = data.get("val_fraction")
    return record


def check_same_study(study, space: dict[str, str], data: dict[str, Any]) -> None:
    """Refuse to add trials to a study that has trials of another search space or of other data; record both in a
    study that has none yet (a new one, or one from before they were recorded)."""
    name = study.study_name
    if study.trials:
        for attr, current, what in ((SPACE_ATTR, space, "of another search space"), (DATA_ATTR, data, "on other data")):
            recorded = study.user_attrs.get(attr)
            if recorded is None:
                log.warning("Study %r has no record of its %s: recording this invocation's", name, what)
                continue
            changed = [k for k in sorted({*recorded, *current}) if recorded.get(k) != current.get(k)]
            if changed:
                show = _show_distribution if attr == SPACE_ATTR else _show_value
                differences = "; ".join(
                    f"{key}: {show(recorded.get(key))} in the study, {show(current.get(key))} now" for key in changed
                )
                raise SearchError(
                    f"Study {name!r} has {len(study.trials)} trial(s) {what} ({differences}). Its trials "
                    f"cannot be ranked with this search's: give a new study name (hydra.sweeper.study_name=NEW, which "
                    f"also gives a new folder under searches/) to start another study, or the study's own settings "
                    f"to continue it."
                )
    study.set_user_attr(SPACE_ATTR, space)
    study.set_user_attr(DATA_ATTR, data)


def _show_distribution(text: str | None) -> str:
    if text is None:
        return "not searched"
    import optuna.distributions as dist

    return repr(dist.json_to_distribution(text))


def _show_value(value: Any) -> str:
    return "not set" if value is None else repr(value)


def _key_of(override: str) -> str:
    """The key of an override as ``split_arguments`` writes it (``+``/``++``/``~`` prefix included)."""
    return override.split("=", 1)[0]


_NO_TEST = (
    "hparams_search: {what}: a search must select on validation only and never compute a test metric. Remove it "
    "(the hparams_search configs set test_after_fit=false); test the chosen setting once, afterwards."
)


def _distribution(override: Override, dist) -> Any:
    value = override.value()
    key = override.get_key_element()
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return dist.IntDistribution(value.start, value.end, log=log_scale)
        return dist.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, RangeSweep):
        numbers = list(value.range())
        if all(isinstance(n, int) for n in numbers) and len(numbers) > 1:
            return dist.IntDistribution(numbers[0], numbers[-1], step=numbers[1] - numbers[0])
        return dist.CategoricalDistribution(numbers)
    if isinstance(value, ChoiceSweep):
        return dist.CategoricalDistribution(list(value.list))
    raise SearchError(f"{key}: {override.input_line!r} is not a sweep the search understands (interval, choice, range)")


def _trial_overrides(trial) -> list[str]:
    return [f"{key}={_format(value)}" for key, value in trial.params.items()]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and any(c in value for c in " ,=()[]{}'\""):
        return "'" + value.replace("'", "\\'") + "'"
    return "null" if value is None else str(value)


def _value(job) -> float | None:
    """The job's objective, or ``None`` if it failed or returned no finite number (the failure is logged)."""
    try:
        value = job.return_value
    except Exception as err:  # noqa: BLE001 - a failed job fails its trial, not the search
        log.error("Job %s failed: %s", job.working_dir, err)
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        log.error("Job %s returned %r, not a finite number: its trial fails", job.working_dir, value)
        return None
    return float(value)
