"""Bad inputs stop the run early, with a message that names the thing and the fix.

Covered elsewhere, not repeated here: a missing dataset folder, a missing test/ split and train/test classes that
differ at test time (test_data.py); checksum mismatch and truncated downloads (test_download.py); weights files
that are missing, not a state_dict or for another architecture, and unknown backbones (test_backbones.py);
unknown freeze modes and head_lr_mult <= 0 on the module (test_module.py).
"""

import importlib
import json
import logging
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from finetune.data import ImageFolderDataModule
from finetune.errors import PathError, SettingError
from finetune.harness.config_keys import check_node_keys
from finetune.harness.exits import fail, user_errors
from finetune.harness.overrides import check_override_syntax
from finetune.harness.run_settings import check_accelerator
from finetune.harness.writable import check_name_lengths, check_writable
from finetune.run import assemble
from finetune.train import train

from .conftest import CONF_DIR, compose_config, make_image_folder, run_cli, tiny_overrides, without


def _datamodule(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(root, batch_size=4, num_workers=0, val_fraction=0.2, image_size=32, **kwargs)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data", classes=("cat", "dog"), n_train=5, n_test=2)


def test_images_directly_in_train_instead_of_class_folders(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("cat",), n_train=3, n_test=1)
    for image in (root / "train" / "cat").iterdir():
        image.rename(root / "train" / image.name)
    (root / "train" / "cat").rmdir()
    with pytest.raises(
        ValueError, match=r"train' holds no class folders \(it holds cat_000.png.*train/<class>/<image>"
    ):
        _ = _datamodule(root).num_classes


def test_an_empty_class_folder_is_named(folder):
    shutil.rmtree(folder / "test" / "dog")
    (folder / "test" / "dog").mkdir()
    (folder / "test" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"Class folder '.*test/dog' holds no images \(files ending in .jpg.*Add"):
        _datamodule(folder).setup("fit")


def test_train_and_test_classes_that_differ_stop_the_run_before_training(tmp_path, folder):
    (folder / "test" / "dog").rename(folder / "test" / "dogs")
    with pytest.raises(ValueError, match=r"Train and test classes differ.*\['cat', 'dog'\].*\['cat', 'dogs'\]"):
        _ = _datamodule(folder).num_classes  # read before the model is built
    with pytest.raises(ValueError, match="Train and test classes differ"):
        train(compose_config(["trainer.max_epochs=1"] + tiny_overrides(folder, tmp_path / "run")))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "Train and test classes differ" in results["error"]
    assert results["history"] == [] and not (tmp_path / "run" / "checkpoints").exists()


def test_non_image_files_are_ignored_and_counted_in_a_warning(folder, caplog):
    (folder / "train" / "cat" / "labels.csv").write_text("a,b")
    (folder / "train" / "dog" / "README").write_text("x")
    (folder / "test" / "cat" / ".DS_Store").write_bytes(b"\0")
    dm = _datamodule(folder)
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        dm.setup("fit")
        dm.setup("test")
    warnings = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert len(warnings) == 1 and "Ignoring 3 file(s)" in warnings[0] and "labels.csv" in warnings[0]
    assert len(dm.train_set) + len(dm.val_set) == 10 and len(dm.test_set) == 4


def test_files_beside_the_class_folders_are_named_not_silently_skipped(folder, caplog):
    shutil.copy(folder / "train" / "cat" / "cat_000.png", folder / "train" / "unsorted.png")
    (folder / "test" / "notes.txt").write_text("x")
    dm = _datamodule(folder)
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        dm.setup("fit")
        dm.setup("test")
    messages = [r.getMessage() for r in caplog.records]
    stray = [m for m in messages if "outside the class folders" in m]
    assert len(stray) == 1 and "Ignoring 1 image(s) directly in" in stray[0] and "unsorted.png" in stray[0]
    assert "train/<class>/" in stray[0]
    assert any("not images" in m and "test/notes.txt" in m for m in messages)
    assert len(dm.train_set) + len(dm.val_set) == 10 and len(dm.test_set) == 4  # the stray photo is in no class


def test_class_folders_that_differ_only_in_case_are_named(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", classes=("Cat", "cat", "dog"), n_train=5, n_test=2)
    if len(list((root / "train").iterdir())) != 3:
        pytest.skip("a case-insensitive file system holds Cat/ and cat/ as one folder")
    dm = _datamodule(root)
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        dm.setup("fit")
    messages = [r.getMessage() for r in caplog.records if "differ only in case" in r.getMessage()]
    assert len(messages) == 2 and "'Cat' and 'cat'" in messages[0]  # train/ and test/
    assert dm.classes == ["Cat", "cat", "dog"]  # still separate classes: a warning, not a merge


def test_a_corrupt_image_fails_in_setup_naming_the_file(folder):
    _truncate(folder / "train" / "dog" / "dog_003.png")
    (folder / "train" / "cat" / "cat_001.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError) as info:
        _datamodule(folder).setup("fit")
    message = str(info.value)
    assert message.startswith("2 corrupt or truncated image(s)")
    assert "cat_001.png (UnidentifiedImageError" in message and "dog_003.png" in message
    assert "data.skip_corrupt=true" in message


def test_a_corrupt_test_image_is_found_before_training(folder):
    _truncate(folder / "test" / "cat" / "cat_000.png")
    with pytest.raises(ValueError, match=r"1 corrupt or truncated image\(s\) in '.*test'.*cat_000.png"):
        _datamodule(folder).setup("fit")


def test_skip_corrupt_leaves_them_out_with_a_warning(folder, caplog):
    _truncate(folder / "train" / "dog" / "dog_003.png")
    (folder / "train" / "cat" / "cat_001.png").write_bytes(b"definitely not a png")
    dm = _datamodule(folder, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        dm.setup("fit")
    assert any("Skipping 2 corrupt or truncated image(s)" in r.getMessage() for r in caplog.records)
    files = {Path(path).name for path, _ in dm.train_set.dataset.samples}
    assert len(files) == 8 and not files & {"dog_003.png", "cat_001.png"}
    assert len(dm.train_set) + len(dm.val_set) == 8


def test_skip_corrupt_still_refuses_a_class_with_no_good_image(folder):
    for image in (folder / "test" / "dog").iterdir():
        image.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"Every image of class\(es\) \['dog'\]"):
        _datamodule(folder, skip_corrupt=True).setup("fit")


def test_a_truncated_jpeg_is_caught(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "data", n_train=2, n_test=1)
    photo = root / "train" / "cat" / "photo.jpg"
    Image.effect_noise((256, 192), 64).convert("RGB").save(photo, quality=90)
    _truncate(photo)
    with pytest.raises(ValueError, match=r"photo.jpg \(OSError: image file is truncated"):
        _datamodule(root).setup("fit")


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(MissingConfigException) as info:
        compose_config(["experiment=finetunning"])
    message = str(info.value)
    assert "experiment/finetunning" in message
    assert all(name in message for name in ("finetune", "frozen", "scratch"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.head_lr_mult=0", r"model.head_lr_mult must be > 0, got 0"),
        ("model.freeze=layers", r"Unknown model.freeze='layers': choose one of \('none', 'backbone'\)"),
        ("data.val_fraction=1.0", r"data.val_fraction must be strictly between 0 and 1, got 1.0"),
        ("data.val_fraction=-0.1", r"data.val_fraction must be strictly between 0 and 1, got -0.1"),
        ("data.val_fraction=0", r"data.val_fraction must be strictly between 0 and 1, got 0: .*selects the checkpoint"),
        ("data.batch_size=0", r"data.batch_size must be an integer >= 1 \(images per device and step\), got 0"),
        ("data.image_size=0", r"data.image_size must be an integer >= 1 .*got 0"),
        ("data.image_size=7", r"data.image_size=7 is below 32 pixels: .*total stride of 32.*data.image_size >= 32"),
        ("data.resize_size=16", r"data.resize_size=16 is smaller than data.image_size=32"),
        ("data.num_workers=-1", r"data.num_workers must be an integer >= 0 .*got -1"),
    ],
)
def test_out_of_range_values_reach_the_user_by_their_config_name(tmp_path, folder, override, message):
    with pytest.raises(Exception, match=message):
        train(compose_config(tiny_overrides(folder, tmp_path) + [override]))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(
    "override, message",
    [
        # values the code fills itself: the config's would be silently replaced (and recorded in .hydra/config.yaml)
        ("+model.num_classes=5", r"model.num_classes cannot be set: the number of classes is the number of class"),
        ("+trainer.logger=false", r"trainer.logger cannot be set: loggers come from the logger group"),
        ("+optimizer.params=[]", r"optimizer.params cannot be set: the model hands the optimizer its parameter"),
        ("+data.test_only=true", r"data.test_only cannot be set"),
        # keys the target does not take: a TypeError traceback (the optimizer's only once fitting starts)
        (
            "+model.backbon=resnet34",
            r"model.backbon: not a setting of model \(finetune.module.FineTuneModule .*"
            r"Did you mean model.backbone\? Its settings: backbone,",
        ),
        ("+data.image_sise=64", r"data.image_sise: not a setting of data .*Did you mean data.image_size\?"),
        ("+optimizer.betas=[0.9,0.99]", r"optimizer.betas: not a setting of optimizer \(torch.optim.SGD takes"),
        ("+trainer.max_epoch=3", r"trainer.max_epoch: not a setting of trainer .*Did you mean trainer.max_epochs, "),
        ("+callbacks.model_checkpoint.save_top=3", r"callbacks.model_checkpoint.save_top: .*save_top_k"),
    ],
)
def test_config_keys_that_would_never_be_used_are_refused_by_name(tmp_path, folder, override, message):
    with pytest.raises(SettingError, match=message):
        train(compose_config(tiny_overrides(folder, tmp_path) + [override]))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "scheduler", "trainer", "callbacks", "logger"])
def test_every_shipped_config_passes_the_key_check(group):
    """No false alarm: each config of each group composes to keys its class takes."""
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        override = f"+{group}={option}" if group in ("callbacks", "logger") else f"{group}={option}"
        cfg = compose_config([override])
        nodes = cfg[group] if group in ("callbacks", "logger") else {group: cfg[group]}
        for name, node in (nodes or {}).items():
            if node is not None and "_target_" in node:
                prefix = f"{group}.{name}" if group in ("callbacks", "logger") else group
                check_node_keys(prefix, OmegaConf.to_container(node, resolve=False))


def test_an_image_size_the_network_cannot_take_is_refused_before_any_data_is_read(tmp_path, folder):
    alexnet = ["model.backbone=alexnet", "data.image_size=48", "data.resize_size=55"]
    overrides = tiny_overrides(folder, tmp_path) + alexnet
    with pytest.raises(SettingError, match=r"data.image_size=48: alexnet cannot take 48x48 images \(.*Output size is"):
        assemble(compose_config(overrides))


def test_pretrained_weights_far_above_the_image_size_get_a_warning(tmp_path, folder, caplog):
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # stands for ImageNet weights, offline
    warned = {}
    for size, weights_setting in ((64, weights), (112, weights), (64, "null")):
        caplog.clear()
        overrides = tiny_overrides(folder, tmp_path / f"{size}") + [f"data.image_size={size}", "data.resize_size=128"]
        with caplog.at_level(logging.WARNING, logger="finetune"):
            run = assemble(compose_config(overrides + [f"model.weights={weights_setting}"]))
        assert run.images.hparams.image_size == size
        warned[(size, str(weights_setting) != "null")] = [
            r.getMessage() for r in caplog.records if "half" in r.getMessage()
        ]
    assert len(warned[(64, True)]) == 1
    assert (
        "data.image_size=64 is under half the size resnet18's pretrained weights were trained at (224)"
        in (warned[(64, True)][0])
    )
    assert warned[(112, True)] == [] and warned[(64, False)] == []  # half of 224 is fine; random weights have no size


# --- mistakes that used to end in a stack trace: one Error line naming the setting, exit code 2 --------------------


def _one_error_line(done, *named: str) -> str:
    """The single ``Error:`` line of a command that stopped on a user's mistake; it contains each of ``named``."""
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert all(text in errors[0] for text in named), errors[0]
    return errors[0]


def _train(args: list[str]):
    return run_cli([*args, "trainer.max_epochs=1"], check=False)


def test_a_user_error_raised_inside_instantiate_ends_as_itself_and_a_bug_keeps_its_exception(capsys):
    target = {"_target_": "finetune.backbones.build_backbone", "name": "resnet19", "num_classes": 2}
    with pytest.raises(SystemExit) as info, user_errors(job=False):
        instantiate(target)  # Hydra wraps the SettingError in an InstantiationException
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("Error: Unknown backbone 'resnet19': not a torchvision classification model")
    with pytest.raises(InstantiationException) as bug, user_errors(job=False):
        instantiate({"_target_": "builtins.int", "_args_": ["not a number"]})
    assert isinstance(bug.value.__cause__, ValueError)


def test_a_message_quoting_another_librarys_lines_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as info:
        fail("Could not read 'w.pth': Weights only load failed.\n\n  Unsupported operand 110\n")
    assert info.value.code == 2
    assert (
        capsys.readouterr().err == "Error: Could not read 'w.pth': Weights only load failed. Unsupported operand 110\n"
    )


@pytest.mark.slow
def test_weights_of_another_architecture_are_one_line_naming_the_backbone_they_fit(tmp_path, tiny_folder):
    """The first thing an offline newcomer tries: a MobileNetV2 file with the default backbone (resnet18)."""
    weights = tmp_path / "mobilenet_v2-features.pth"
    state = torchvision.models.mobilenet_v2().state_dict()
    torch.save({key: value for key, value in state.items() if key.startswith("features.")}, weights)
    out = tmp_path / "run"
    done = _train([*without(tiny_overrides(tiny_folder, out), "model.weights"), f"model.weights={weights}"])
    _one_error_line(done, "(model.weights) does not fit model.backbone=resnet18", "fit model.backbone=mobilenet_v2")
    # Refused before training: the Error line is its whole record; neither its run folder below paths.log_dir nor
    # paths.output_dir keeps anything of it.
    assert sorted(p.name for p in out.iterdir()) == ["logs"] and list((out / "logs" / "runs").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["list", "folder"])
def test_a_weights_file_that_is_not_a_state_dict_or_a_folder_is_one_line(tmp_path, tiny_folder, kind):
    if kind == "list":
        weights, named = tmp_path / "list.pth", "does not hold a state_dict (a dict of tensors); it holds a list"
        torch.save([torch.zeros(1)], weights)
    else:
        weights, named = tmp_path / "weights", "is a folder, not a weights file. It holds resnet18.pth: pass one"
        weights.mkdir()
        torch.save({}, weights / "resnet18.pth")
        (weights / "notes.txt").write_text("where these came from")
    done = _train(
        [*without(tiny_overrides(tiny_folder, tmp_path / "run"), "model.weights"), f"model.weights={weights}"]
    )
    _one_error_line(done, "model.weights", named)


@pytest.mark.slow
def test_a_dataset_with_one_class_is_one_line_naming_data_root_and_the_class(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("cat",), n_train=5, n_test=2)
    done = _train(tiny_overrides(root, tmp_path / "run"))
    _one_error_line(done, f"data.root='{root}' holds 1 class ['cat']: a classifier needs at least two")


_HAS_GPU = torch.cuda.is_available() or torch.backends.mps.is_available()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "named"),
    [
        pytest.param(
            "trainer.accelerator=gpu",
            "trainer.accelerator=gpu, but PyTorch sees no GPU",
            marks=pytest.mark.skipif(_HAS_GPU, reason="this machine has a GPU"),
        ),
        ("trainer.precision=bf17", "trainer.precision=bf17: Lightning cannot build its Trainer"),
        ("model.backbone=", "Unknown backbone ''"),
    ],
)
def test_trainer_and_model_settings_refused_inside_instantiate_are_one_line(tmp_path, tiny_folder, setting, named):
    _one_error_line(_train([*tiny_overrides(tiny_folder, tmp_path / "run"), setting]), named)


def test_lightnings_refusal_of_trainer_flags_names_the_settings_it_mentions():
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from finetune.run import trainer_setting_error

    trainer = compose_config([]).trainer
    refused = trainer_setting_error(trainer, MisconfigurationException("Precision 'bf17' is invalid."))
    assert str(refused).startswith("trainer.precision=32-true: Lightning cannot build its Trainer with these settings")
    assert trainer_setting_error(trainer, RuntimeError("a bug")) is None


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "mps"])
def test_an_accelerator_that_is_not_there_is_refused_by_name(accelerator):
    present = {"gpu": _HAS_GPU, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if present[accelerator]:
        check_accelerator(accelerator)  # there: nothing to refuse
        return
    with pytest.raises(
        SettingError, match=rf"^trainer.accelerator={accelerator}, but PyTorch sees no .*accelerator=cpu"
    ):
        check_accelerator(accelerator)


def test_an_empty_data_root_is_named_as_empty_not_read_as_the_current_folder(tmp_path, folder):
    with pytest.raises(SettingError, match=r"^data.root is empty: set data.root=PATH"):
        train(compose_config([*tiny_overrides(folder, tmp_path / "run"), "data.root="]))


# --- the command line: a value Hydra's grammar cannot read, a run folder name too long for the filesystem ----------

ENTRY_POINTS = ["train", "evaluate", "predict", "export", "calibrate", "lr_find", "robustness", "shards", "soup"]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_an_apostrophe_in_a_value_is_one_line_showing_the_quoting_in_every_entry_point(
    entry_point, monkeypatch, capsys
):
    module = importlib.import_module(f"finetune.{entry_point}")
    monkeypatch.setattr(sys, "argv", [entry_point, "seed=1", "data.root=/x/bob's photos"])
    with pytest.raises(SystemExit) as info:
        module.main()
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith('Error: Hydra cannot read the override "data.root=/x/bob\'s photos"')
    shell_word = line.rsplit("for the shell: ", 1)[1].removesuffix(".")
    assert shell_word == '"data.root=\\"/x/bob\'s photos\\""'  # "data.root=\"/x/bob's photos\""
    [override] = shlex.split(shell_word)  # what the shell passes on: Hydra reads the value given
    assert OverridesParser.create().parse_override(override).value() == "/x/bob's photos"


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("data.root=/x/a#b", "'data.root=\"/x/a#b\"'"),
        ("ckpt_path=/x/run(2)/last.ckpt", "'ckpt_path=\"/x/run(2)/last.ckpt\"'"),
        ("data.root=/x/a=b", "'data.root=\"/x/a=b\"'"),
    ],
)
def test_other_values_hydra_cannot_read_show_their_quoting(override, shown):
    with pytest.raises(SettingError, match=r"^Hydra cannot read the override") as info:
        check_override_syntax(["-m", override, "--cfg", "job"])
    assert str(info.value).endswith(f"for the shell: {shown}.")
    value = override.partition("=")[2]
    assert OverridesParser.create().parse_override(shlex.split(shown)[0]).value() == value


def test_overrides_hydra_reads_and_hydras_flags_pass_the_check():
    check_override_syntax(["-m", "--config-name", "train", "data.root=/x/a b", "~logger", "+x='a(b)'", "seed=0,1"])
    check_override_syntax(["+callbacks=[ema,mixup]", "+callbacks.ema.decay=0.9", "+logger=csv"])


def test_a_value_hydra_reads_as_a_sweep_outside_a_multirun_is_one_line_with_its_quoting():
    """A path with a comma: Hydra's own "Ambiguous value for argument" ends in exit 1 and a stack-trace hint."""
    with pytest.raises(SettingError) as info:
        check_override_syntax(["data.root=/x/photos,2024", "seed=0"])
    message = str(info.value)
    assert message.startswith("data.root=/x/photos,2024: Hydra reads this value as a sweep")
    assert "quote it: 'data.root=\"/x/photos,2024\"'; for a list, data.root=[...]; to sweep over" in message
    [quoted] = shlex.split("'data.root=\"/x/photos,2024\"'")
    assert OverridesParser.create().parse_override(quoted).value() == "/x/photos,2024"
    check_override_syntax(["-m", "data.root=/x/photos,2024", "seed=range(2)"])  # a multirun sweeps them


def test_a_config_group_added_twice_is_one_line_with_the_list_that_works(tmp_path, tiny_folder):
    """Hydra's own message ("Multiple values for callbacks") ends in exit 1 and a stack-trace hint."""
    with pytest.raises(SettingError) as info:
        check_override_syntax(["+callbacks=lora", "seed=1", "+callbacks=[ema,mixup]"])
    assert str(info.value) == (
        "+callbacks=lora and +callbacks=[ema,mixup]: Hydra adds a config group once per command line. Give both in "
        "one list: '+callbacks=[lora,ema,mixup]'."
    )
    listed = compose_config([*tiny_overrides(tiny_folder, tmp_path), "+callbacks=[ema,mixup]"])
    assert {"ema", "mixup"} <= set(listed.callbacks)  # the suggested form composes


@pytest.mark.slow
def test_an_apostrophe_on_the_command_line_is_one_error_line_and_its_quoting_works(tmp_path, tiny_folder):
    photos = tmp_path / "bob's photos"
    args = without(tiny_overrides(tiny_folder, tmp_path / "run"), "data.root")
    error = _one_error_line(_train([*args, f"data.root={photos}"]), "Hydra cannot read the override", "double quotes")
    [quoted] = shlex.split(error.rsplit("for the shell: ", 1)[1].removesuffix("."))
    # Quoted as the message says, Hydra reads the path: the run gets as far as looking for the folder.
    _one_error_line(_train([*args, quoted]), f'Dataset folder "{photos}" (data.root) does not exist')


@pytest.mark.slow
def test_a_run_folder_name_too_long_for_the_filesystem_is_one_line_naming_name(tmp_path, tiny_folder):
    logs = tmp_path / "logs"
    args = [*without(tiny_overrides(tiny_folder, tmp_path), "paths."), f"paths.log_dir={logs}", "name=" + "x" * 300]
    error = _one_error_line(_train(args), "The run folder (hydra.run.dir", "more than the 255", "a shorter name=")
    assert "bytes long" in error and not (logs / "runs").exists()  # refused before any folder was made
    done = run_cli(["-m", *args, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"], check=False)
    _one_error_line(done, "A multirun job's folder (hydra.sweep.dir, hydra.sweep.subdir)", "_seed0", "shorter name=")


def test_name_lengths_are_checked_against_the_filesystems_limit(tmp_path):
    check_name_lengths(tmp_path / ("x" * 200) / "y", "paths.log_dir=...", "Shorten it.")
    with pytest.raises(PathError, match=r"^paths.log_dir=...: the name 'x{40}\.\.\.x{12}' is 300 bytes long, more "):
        check_name_lengths(tmp_path / ("x" * 300) / "y", "paths.log_dir=...", "Shorten it.")
    with pytest.raises(
        PathError, match=r"^paths.output_dir=.*is 256 bytes long.*Pass paths.output_dir= a shorter path"
    ):
        check_writable(tmp_path / ("é" * 128), "paths.output_dir")  # 128 characters, 256 bytes
