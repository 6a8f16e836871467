"""Weight interpolation and model soups: ``python -m finetune.soup method=wise|uniform|greedy ckpts=[A,B,...]``.

- ``wise`` (WiSE-FT, Wortsman et al. 2022): two checkpoints of one run family, ``A`` (e.g. the linear probe, whose
  backbone is the pretrained one) and ``B`` (the fine-tuned model): ``(1 - alpha) * A + alpha * B``; ``alpha=null``
  sweeps ``alphas`` and keeps the best validation accuracy (ties: the lower validation NLL), a number uses it.
- ``uniform``: the mean of every checkpoint's weights.
- ``greedy`` (model soups, Wortsman et al. 2022): the checkpoints by validation accuracy, best first; each joins the
  soup when the soup's validation accuracy does not drop.

Everything is chosen on the validation split of the data settings given, which must be the checkpoints' own split
(their recorded ``data.split_seed``, ``val_fraction``, ``folds`` and ``fold`` are checked): the test split is never
read. Writes ``soup.ckpt`` (a normal checkpoint: evaluate, predict, export and the shift benchmark take it; with
``calibrate=true`` it gets a temperature fitted on validation, where one can be trusted) and ``soup.json`` (every
candidate's validation score).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from finetune import atomic
from finetune.data.transforms import CLASSES, PREPROCESSING
from finetune.errors import SettingError
from finetune.harness.checkpoint_data import check_classes, use_checkpoint_geometry
from finetune.harness.checkpoint_io import (
    CheckpointError,
    check_finite_weights,
    load_checkpoint,
    load_for_inference,
)
from finetune.harness.checkpoint_io import preprocessing as checkpoint_preprocessing
from finetune.harness.claim import claim_run_folder
from finetune.harness.config_keys import check_checkpoint_command
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.results import write_json_atomic
from finetune.harness.run_settings import check_seed
from finetune.harness.writable import check_apart
from finetune.run import CONFIG_DIR, assemble
from finetune.scoring import TEMPERATURE
from finetune.temperature import calibrate_logits, collect_logits, temperature_line

log = logging.getLogger(__name__)

METHODS = ("wise", "uniform", "greedy")
SPLIT_KEYS = ("split_seed", "val_fraction", "folds", "fold")  # what decides the validation split
SOUP, RECORD = "soup.ckpt", "soup.json"
# What a soup checkpoint keeps of its base: enough to evaluate, predict and export, not to resume a fit.
KEPT_KEYS = (
    "state_dict",
    "hyper_parameters",
    "datamodule_hyper_parameters",
    CLASSES,
    PREPROCESSING,
    "pytorch-lightning_version",
)

State = dict[str, torch.Tensor]


def check_alpha(alpha: Any) -> float | None:
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise SettingError(
            f"alpha must be a number in [0, 1] (0: the first checkpoint, 1: the second) or null to choose it on "
            f"validation, got {alpha!r}."
        )
    return float(alpha)


def check_alphas(alphas: Any) -> list[float]:
    if not isinstance(alphas, Sequence) or isinstance(alphas, str) or not alphas:
        raise SettingError(f"alphas must be a list of numbers in [0, 1], e.g. [0, 0.5, 1], got {alphas!r}.")
    return [check_alpha(a) for a in alphas]


def check_ingredients(checkpoints: dict[str, dict[str, Any]]) -> None:
    """Refuse checkpoints that cannot share weights: other backbones, classes, eval preprocessing, tensors or split."""
    (first_path, first), *others = checkpoints.items()
    for path, checkpoint in others:
        for what, read in (
            ("backbone (model.backbone)", lambda c: (c.get("hyper_parameters") or {}).get("backbone")),
            ("number of classes", lambda c: (c.get("hyper_parameters") or {}).get("num_classes")),
            ("classes", lambda c: c.get(CLASSES)),
            ("eval preprocessing (data.image_size, resize_size, mean, std, ...)", _preprocessing),
            ("validation split (data.split_seed, val_fraction, folds, fold)", _split),
        ):
            if read(checkpoint) is None or read(first) is None:
                log.warning("%s or %s records no %s: it is not checked.", path, first_path, what)
                continue
            if read(checkpoint) != read(first):
                raise CheckpointError(
                    f"{path} and {first_path} differ in their {what}: {read(checkpoint)!r} vs {read(first)!r}. "
                    "A soup mixes checkpoints of one run family (one backbone, classes, preprocessing and split)."
                )
        ours, theirs = first["state_dict"], checkpoint["state_dict"]
        if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
            raise CheckpointError(f"{path} and {first_path} hold different tensors: they are not one architecture.")


def check_distinct(paths: Sequence[Path]) -> None:
    """Refuse a checkpoint named twice in ``ckpts`` (by any path to the same file): a soup of a model with itself
    is that model, and mixing in a copy would only weight it twice."""
    seen: dict[Path, Path] = {}
    for path in paths:
        same = seen.setdefault(Path(os.path.realpath(path.expanduser())), path)
        if same is not path:
            also = "" if str(same) == str(path) else f" (as {str(same)!r} and {str(path)!r})"
            raise SettingError(
                f"ckpts names the checkpoint {str(path)!r} twice{also}: a soup mixes different checkpoints. List "
                "each once, e.g. ckpts=[RUN_A/checkpoints/last.ckpt,RUN_B/checkpoints/last.ckpt]."
            )


def _preprocessing(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint_preprocessing(checkpoint).to_dict()


def _split(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The settings of the checkpoint's validation split; None where it records none (older cached-feature runs)."""
    data = checkpoint.get("datamodule_hyper_parameters")
    return {key: data.get(key) for key in SPLIT_KEYS} if data else None


def interpolate(states: Sequence[State], weights: Sequence[float]) -> State:
    """``sum(w * state)`` of every floating-point tensor; the others (BatchNorm's step counts) from the first."""
    mixed = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            mixed[key] = sum(w * s[key].double() for s, w in zip(states, weights, strict=True)).to(first.dtype)
        else:
            mixed[key] = first.clone()
    return mixed


def soup(cfg: DictConfig) -> dict[str, Any]:
    check_checkpoint_command(cfg, "soup")
    method = str(cfg.method)
    if method not in METHODS:
        raise SettingError(f"Unknown method={method!r}: choose one of {METHODS}.")
    paths = [Path(p) for p in (cfg.ckpts or [])]
    if method == "wise" and len(paths) != 2:
        raise SettingError(f"method=wise interpolates two checkpoints, ckpts=[A,B]; got {len(paths)}.")
    if len(paths) < 2:
        raise SettingError(f"A soup needs at least two checkpoints in ckpts=[...]; got {len(paths)}.")
    check_distinct(paths)
    alpha = check_alpha(cfg.get("alpha"))
    alphas = check_alphas(OmegaConf.to_container(cfg.alphas) if cfg.get("alphas") is not None else None)
    pl.seed_everything(check_seed(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    check_apart(
        {f"paths.output_dir={output_dir} (its {name})": output_dir / name for name in (SOUP, RECORD)},
        {"ckpts": paths},
    )
    claim_run_folder(output_dir)
    checkpoints = {str(p): load_checkpoint(p, setting="ckpts") for p in paths}
    for path, checkpoint in checkpoints.items():
        check_finite_weights(checkpoint.get("state_dict") or {}, path, setting="ckpts")  # would poison every soup
    check_ingredients(checkpoints)

    base_path = paths[-1] if method == "wise" else paths[0]  # wise: the fine-tuned model's recipe
    model, base = load_for_inference(base_path)
    use_checkpoint_geometry(cfg, base, base_path)
    run = assemble(cfg, model=model)
    recorded, given = _split(base), {key: run.images.hparams.get(key) for key in SPLIT_KEYS}
    if recorded is not None and recorded != given:
        raise SettingError(
            f"The checkpoints were validated on the split {recorded}, but these data settings give {given}: pass "
            "the runs' data.split_seed/val_fraction/folds/fold, so that the soup is chosen on their validation split."
        )
    run.images.setup("fit")
    check_classes(base, model, run.images, base_path)
    states = [c["state_dict"] for c in checkpoints.values()]

    def score(state: State) -> dict[str, float]:
        model.load_state_dict(state)
        logits, targets = collect_logits(model, run.images.val_set, run.images.batch_size)
        if len(targets) == 0:
            raise SettingError("The validation split holds no image: a soup is chosen on it (data.val_fraction).")
        acc = float((logits.argmax(dim=1) == targets).float().mean())
        return {"val/acc": acc, "val/nll": float(F.cross_entropy(logits, targets))}

    candidates: list[dict[str, Any]] = []
    if method == "wise":
        for a in [alpha] if alpha is not None else alphas:
            candidates.append({"alpha": a, **score(interpolate(states, [1 - a, a]))})
        chosen = max(candidates, key=lambda c: (c["val/acc"], -c["val/nll"]))
        final = interpolate(states, [1 - chosen["alpha"], chosen["alpha"]])
        ingredients = [str(p) for p in paths]
    elif method == "uniform":
        final = interpolate(states, [1 / len(states)] * len(states))
        chosen = {"ingredients": [str(p) for p in paths], **score(final)}
        candidates = [{"checkpoint": str(p), **score(s)} for p, s in zip(paths, states, strict=True)] + [chosen]
        ingredients = [str(p) for p in paths]
    else:
        singles = [{"checkpoint": str(p), **score(s)} for p, s in zip(paths, states, strict=True)]
        order = sorted(range(len(paths)), key=lambda i: -singles[i]["val/acc"])
        ingredients, kept, best, trials = [], [], None, []
        for i in order:
            if not kept:  # the best single checkpoint starts the soup; its score is known
                kept, best, ingredients = [i], singles[i], [str(paths[i])]
                continue
            trial = interpolate([states[j] for j in [*kept, i]], [1 / (len(kept) + 1)] * (len(kept) + 1))
            result = score(trial)
            joins = result["val/acc"] >= best["val/acc"]
            trials.append({"ingredients": [*ingredients, str(paths[i])], **result, "kept": joins})
            if joins:
                kept.append(i)
                best = result
                ingredients.append(str(paths[i]))
        final = interpolate([states[j] for j in kept], [1 / len(kept)] * len(kept))
        chosen = {"ingredients": ingredients, **{k: best[k] for k in ("val/acc", "val/nll")}}
        candidates = [*singles, *trials]  # every soup tried, "kept" where its checkpoint joined

    checkpoint = {key: base[key] for key in KEPT_KEYS if key in base}
    checkpoint["state_dict"] = final
    checkpoint[TEMPERATURE] = 1.0
    model.load_state_dict(final)
    calibration: dict[str, Any] = {}
    if cfg.get("calibrate", True):
        logits, targets = collect_logits(model, run.images.val_set, run.images.batch_size)
        calibration = {f"val/{k}": v for k, v in calibrate_logits(logits, targets).items()}
        checkpoint[TEMPERATURE] = calibration["val/temperature"]  # 1 where the fit cannot be trusted
    output = output_dir / SOUP
    atomic.torch_save(checkpoint, output)
    record = {
        "method": method,
        "ingredients": ingredients,
        "chosen": chosen,
        "candidates": candidates,
        **calibration,
        "soup_checkpoint": str(output),
    }
    write_json_atomic(output_dir / RECORD, record)
    what = f"alpha {chosen['alpha']:g}" if method == "wise" else f"{len(ingredients)} of {len(paths)} checkpoints"
    said = f"{method} soup ({what}): val/acc {chosen['val/acc']:.4f}. Wrote {output}"
    tell(f"{said}\n{temperature_line(calibration)}" if calibration else said)
    return record


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="soup")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    soup(cfg)


if __name__ == "__main__":
    main()
