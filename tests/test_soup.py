"""WiSE-FT and model soups: weights interpolated exactly, chosen on validation, refused across run families."""

from __future__ import annotations

import json
import re

import pytest
import torch

from finetune.errors import SettingError
from finetune.harness.checkpoint_io import CheckpointError, load_for_inference
from finetune.run import compose_config
from finetune.soup import check_alpha, interpolate, soup
from finetune.train import train

from .conftest import make_image_folder, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """A probe (frozen head) and two fine-tuned runs of one split, and their data."""
    root = make_image_folder(tmp_path_factory.mktemp("data"), n_train=10, n_test=4)
    runs = {}
    for name, extra in {
        "probe": ["experiment=frozen", "features=cached", "data.augmentation=null"],
        "tuned0": ["seed=0"],
        "tuned1": ["seed=1"],
    }.items():
        out = tmp_path_factory.mktemp(name)
        overrides = [*extra, "trainer.max_epochs=2", "optimizer.lr=0.02", "model.head_lr_mult=1", "calibrate=false"]
        results = train(compose_config(overrides + tiny_overrides(root, out)))
        assert results["status"] == "completed", results.get("error")
        runs[name] = results["best_checkpoint"]
    return {"root": root, **runs}


def soup_config(family: dict, output, *extra: str):
    return compose_config(
        [
            "data=folder",
            f"data.root={family['root']}",
            "data.image_size=32",
            "data.resize_size=36",
            "data.val_fraction=0.2",
            "data.num_workers=0",
            "data.batch_size=4",
            f"paths.output_dir={output}",
            *extra,
        ],
        config_name="soup",
    )


def test_interpolate_is_the_weighted_sum_and_keeps_integer_buffers():
    a = {"w": torch.tensor([0.0, 2.0]), "steps": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "steps": torch.tensor(9)}
    mixed = interpolate([a, b], [0.75, 0.25])
    assert torch.allclose(mixed["w"], torch.tensor([1.0, 3.0])) and mixed["steps"].item() == 3


def test_wise_ft_at_fixed_alpha_writes_the_interpolated_checkpoint(family, tmp_path):
    ckpts = f"ckpts=[{family['probe']},{family['tuned0']}]"
    record = soup(soup_config(family, tmp_path / "wise", "method=wise", ckpts, "alpha=0.5", "calibrate=false"))
    probe = torch.load(family["probe"], weights_only=True)["state_dict"]
    tuned = torch.load(family["tuned0"], weights_only=True)["state_dict"]
    model, checkpoint = load_for_inference(tmp_path / "wise" / "soup.ckpt")
    key = next(k for k, v in tuned.items() if v.is_floating_point() and not torch.equal(v, probe[k]))
    assert torch.allclose(checkpoint["state_dict"][key], (probe[key] + tuned[key]) / 2, atol=1e-6)
    assert model.hparams.freeze == "none"  # the fine-tuned model's recipe
    assert record["chosen"]["alpha"] == 0.5 and "optimizer_states" not in checkpoint
    # A probe on cached features records its image data's split like any run, so the soup checked it.
    assert torch.load(family["probe"], weights_only=True)["datamodule_hyper_parameters"]["split_seed"] == 0


def test_wise_ft_sweeps_alpha_on_validation_and_calibrates(family, tmp_path):
    ckpts = f"ckpts=[{family['probe']},{family['tuned0']}]"
    record = soup(soup_config(family, tmp_path / "sweep", "method=wise", ckpts, "alphas=[0,0.5,1]"))
    accs = {c["alpha"]: c["val/acc"] for c in record["candidates"]}
    assert set(accs) == {0.0, 0.5, 1.0} and record["chosen"]["val/acc"] == max(accs.values())
    assert json.loads((tmp_path / "sweep" / "soup.json").read_text())["chosen"] == record["chosen"]
    stored = torch.load(tmp_path / "sweep" / "soup.ckpt", weights_only=True)
    assert stored["temperature"] == pytest.approx(record["val/temperature"])
    # 4 validation images: as after training, a temperature fitted on so few is recorded but not applied.
    assert record["val/temperature_images"] == 4 and record["val/temperature_reliable"] is False
    assert record["val/temperature"] == 1.0 and "fewer than 20" in record["val/temperature_reason"]


def test_uniform_and_greedy_soups(family, tmp_path):
    ckpts = f"ckpts=[{family['tuned0']},{family['tuned1']}]"
    uniform = soup(soup_config(family, tmp_path / "u", "method=uniform", ckpts, "calibrate=false"))
    a, b = (torch.load(family[k], weights_only=True)["state_dict"] for k in ("tuned0", "tuned1"))
    written = torch.load(tmp_path / "u" / "soup.ckpt", weights_only=True)["state_dict"]
    key = next(k for k, v in a.items() if v.is_floating_point() and not torch.equal(v, b[k]))
    assert torch.allclose(written[key], (a[key] + b[key]) / 2, atol=1e-6) and len(uniform["ingredients"]) == 2
    greedy = soup(soup_config(family, tmp_path / "g", "method=greedy", ckpts, "calibrate=false"))
    singles = [c["val/acc"] for c in greedy["candidates"][:2]]
    assert greedy["chosen"]["val/acc"] >= max(singles)  # greedy never ends below its best ingredient
    assert greedy["ingredients"][0] in {family["tuned0"], family["tuned1"]}
    [trial] = greedy["candidates"][2:]  # the one soup tried: the best single checkpoint with the other
    assert sorted(trial["ingredients"]) == sorted([family["tuned0"], family["tuned1"]])
    assert trial["kept"] == (len(greedy["ingredients"]) == 2) == (trial["val/acc"] >= max(singles))
    soup_state = torch.load(tmp_path / "g" / "soup.ckpt", weights_only=True)["state_dict"]
    expected = (
        (a[key] + b[key]) / 2
        if trial["kept"]
        else {family["tuned0"]: a, family["tuned1"]: b}[greedy["ingredients"][0]][key]
    )
    assert torch.allclose(soup_state[key], expected, atol=1e-6)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "half", True])
def test_alpha_outside_zero_one_is_refused(alpha):
    with pytest.raises(SettingError, match=r"alpha must be a number in \[0, 1\]"):
        check_alpha(alpha)


def test_checkpoints_of_other_families_are_refused_by_what_differs(family, tmp_path):
    other_root = make_image_folder(tmp_path / "other", classes=("cat", "fox"), n_train=10, n_test=4)
    results = train(
        compose_config(["trainer.max_epochs=1", "calibrate=false"] + tiny_overrides(other_root, tmp_path / "o"))
    )
    ckpts = f"ckpts=[{family['tuned0']},{results['best_checkpoint']}]"
    with pytest.raises(CheckpointError, match=r"differ in their classes"):
        soup(soup_config(family, tmp_path / "s1", "method=uniform", ckpts))
    resnet = train(
        compose_config(
            ["trainer.max_epochs=1", "calibrate=false", "model.backbone=resnet34"]
            + tiny_overrides(family["root"], tmp_path / "r")
        )
    )
    ckpts = f"ckpts=[{family['tuned0']},{resnet['best_checkpoint']}]"
    with pytest.raises(CheckpointError, match=r"differ in their backbone"):
        soup(soup_config(family, tmp_path / "s2", "method=uniform", ckpts))
    with pytest.raises(SettingError, match=r"method=wise interpolates two checkpoints"):
        soup(soup_config(family, tmp_path / "s3", "method=wise", f"ckpts=[{family['tuned0']}]"))
    with pytest.raises(SettingError, match=r"validated on the split"):
        soup(soup_config(family, tmp_path / "s4", "method=uniform", f"ckpts=[{family['tuned0']},{family['tuned1']}]",
                         "data.split_seed=5"))  # fmt: skip


@pytest.mark.parametrize("method", ["wise", "uniform", "greedy"])
def test_the_same_checkpoint_twice_is_refused_by_name_before_anything_is_read(tmp_path, method):
    a = tmp_path / "run" / "checkpoints" / "last.ckpt"
    a.parent.mkdir(parents=True)
    a.write_bytes(b"never read")  # the check comes before any checkpoint is loaded
    for ckpts, shown in ((f"[{a},{a}]", ""), (f"[{a},{a.parent}/../checkpoints/last.ckpt]", " (as ")):
        cfg = compose_config([f"ckpts={ckpts}", f"method={method}", f"paths.output_dir={tmp_path / 'soup'}"], "soup")
        with pytest.raises(SettingError, match=rf"^ckpts names the checkpoint .*last.ckpt' twice{re.escape(shown)}"):
            soup(cfg)
    assert not (tmp_path / "soup").exists()


@pytest.mark.slow
def test_the_same_checkpoint_twice_on_the_command_line_is_one_error_line(tmp_path):
    a = tmp_path / "last.ckpt"
    a.write_bytes(b"never read")
    done = run_cli([f"ckpts=[{a},{a}]", f"hydra.run.dir={tmp_path / 'soup'}"], check=False, module="finetune.soup")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: ckpts names the checkpoint '{a}' twice")
