"""model.head_init: the head started from the pretrained classifier's rows, the zero-shot run that allows
(trainer.max_epochs=0), WiSE-FT between the zero-shot and the fine-tuned model, and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from finetune.backbones import build_backbone
from finetune.backbones.head_init import combined_rows
from finetune.errors import SettingError
from finetune.evaluate import evaluate
from finetune.run import assemble, check_settings, compose_config
from finetune.soup import soup
from finetune.train import train

from .conftest import (
    EFFICIENTNET_LITE2_WEIGHTS,
    KAGGLE_HOTDOG,
    MOBILENET_V2_WEIGHTS,
    make_image_folder,
    needs_shared,
    tiny_overrides,
    without,
)

HOT_DOG = 934
REST = [i for i in range(1000) if i != HOT_DOG]
# Given in the other order than the class folders' (hot_dog, not_hot_dog): the head follows the folders.
MAPPING = "model.head_init.classes={not_hot_dog:rest,hot_dog:[934]}"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A ResNet-18 with random weights saved with its 1000-class head (a known source classifier), the same
    weights without the head, and a hot dog folder."""
    folder = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    torch.save(net.state_dict(), folder / "full.pth")
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, folder / "backbone.pth")
    root = make_image_folder(folder / "data", classes=("hot_dog", "not_hot_dog"), n_train=8, n_test=3)
    return {"net": net, "full": folder / "full.pth", "backbone": folder / "backbone.pth", "root": root}


def source_overrides(source: dict, output: Path, *extra: str) -> list[str]:
    """The source head with :data:`MAPPING`, or with the mapping in ``extra`` (Hydra merges a second dict value)."""
    mapping = [] if any(e.startswith("model.head_init.classes=") for e in extra) else [MAPPING]
    return without(tiny_overrides(source["root"], output), "model.weights") + [
        f"pretrained_weights={source['full']}",  # what finetune and frozen start from; scratch: nothing
        "model.head_init.from=source",
        *mapping,
        *extra,
    ]


def test_one_row_is_kept_and_a_group_is_its_mean_plus_log_count():
    torch.manual_seed(0)
    weight, bias = torch.randn(5, 3), torch.randn(5)
    rows, offsets = combined_rows(weight, bias, [[2], [0, 1, 3, 4]])
    assert torch.equal(rows[0], weight[2]) and offsets[0] == bias[2]
    assert torch.allclose(rows[1], weight[[0, 1, 3, 4]].mean(0), atol=1e-6)
    assert offsets[1].item() == pytest.approx(bias[[0, 1, 3, 4]].mean().item() + math.log(4), abs=1e-6)
    # Where a group's logits are equal, the row gives the group's log-sum-exp exactly (log of its probability mass).
    same = torch.randn(3).repeat(4, 1)
    rows, offsets = combined_rows(same, torch.full((4,), 0.5), [[0, 1, 2, 3]])
    features = torch.randn(7, 3)
    exact = torch.logsumexp(features @ same.T + 0.5, dim=1)
    assert torch.allclose(features @ rows[0] + offsets[0], exact, atol=1e-5)


def test_the_head_starts_as_the_source_logits_combined_in_the_class_folders_order(source, tmp_path):
    run = assemble(compose_config(source_overrides(source, tmp_path / "run")))
    assert run.images.classes == ["hot_dog", "not_hot_dog"]
    assert run.model.hparams.head_init["classes"] == {"hot_dog": [HOT_DOG], "not_hot_dog": "rest"}
    model = run.model.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, source_logits = model(images), source["net"](images)
    assert torch.allclose(logits[:, 0], source_logits[:, HOT_DOG], atol=1e-4)
    assert torch.allclose(logits[:, 1], source_logits[:, REST].mean(dim=1) + math.log(999), atol=1e-4)
    plain = tiny_overrides(source["root"], tmp_path / "x") + [f"model.weights={source['full']}"]
    xavier = assemble(compose_config(plain))
    assert not torch.allclose(xavier.model.net.fc.weight[0], source["net"].fc.weight[HOT_DOG])  # the book's head


def test_a_zero_shot_run_then_wise_ft_between_it_and_the_fine_tune_that_started_from_it(source, tmp_path):
    zero = train(compose_config(source_overrides(source, tmp_path / "zero", "trainer.max_epochs=0")))
    assert zero["status"] == "completed" and zero["epochs"] == 0 and zero["history"] == []
    assert Path(zero["best_checkpoint"]).name == "zero_shot.ckpt" and zero["last_checkpoint"] is None
    assert 0 <= zero["val/acc"] <= 1 and zero["test/acc"] is not None and zero["test/auroc"] is not None
    zero_state = torch.load(zero["best_checkpoint"], weights_only=True)
    assert torch.allclose(zero_state["state_dict"]["net.fc.weight"][0], source["net"].fc.weight[HOT_DOG])
    assert zero_state["classes"] == ["hot_dog", "not_hot_dog"] and "temperature" in zero_state

    tuned = train(compose_config(source_overrides(source, tmp_path / "tuned", "trainer.max_epochs=2")))
    assert tuned["status"] == "completed" and tuned["epochs"] == 2
    tuned_state = torch.load(tuned["best_checkpoint"], weights_only=True)["state_dict"]
    assert not torch.allclose(tuned_state["net.fc.weight"], zero_state["state_dict"]["net.fc.weight"])  # it trained

    soup_overrides = [
        "data=folder",
        f"data.root={source['root']}",
        "data.image_size=32",
        "data.resize_size=36",
        "data.val_fraction=0.2",
        "data.num_workers=0",
        "data.batch_size=4",
        f"paths.output_dir={tmp_path / 'wise'}",
        "method=wise",
        f"ckpts=[{zero['best_checkpoint']},{tuned['best_checkpoint']}]",
        "alpha=0.5",
        "calibrate=false",
    ]
    record = soup(compose_config(soup_overrides, config_name="soup"))
    mixed = torch.load(tmp_path / "wise" / "soup.ckpt", weights_only=True)["state_dict"]["net.fc.weight"]
    expected = (zero_state["state_dict"]["net.fc.weight"] + tuned_state["net.fc.weight"]) / 2
    assert record["chosen"]["alpha"] == 0.5 and torch.allclose(mixed, expected, atol=1e-6)

    scored = evaluate(
        compose_config(
            [f"ckpt_path={zero['best_checkpoint']}", f"paths.output_dir={tmp_path / 'eval'}", "data.num_workers=0"],
            config_name="eval",
        )
    )
    assert scored["test/acc"] == pytest.approx(zero["test/acc"])  # the checkpoint scores as the run tested it


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.head_init.classes={hot_dog:[1200],not_hot_dog:rest}"], r"source class index 1200, but model.weights"),
        (["model.head_init.classes={hot_dog:[934]}"], r"does not map the class folder\(s\) not_hot_dog"),
        (["model.head_init.classes={hot_dog:[934],cat:[1],not_hot_dog:rest}"], r"cat is not a class folder"),
        (["model.head_init.classes={hot_dog:[934],not_hot_dog:[0,1]}"], None),  # a list for every class: fine
    ],
)
def test_a_mapping_that_does_not_fit_the_head_or_the_folders_is_refused_by_name(source, tmp_path, extra, message):
    cfg = compose_config(source_overrides(source, tmp_path / "run", *extra))
    if message is None:
        assert assemble(cfg).model.net.fc.out_features == 2
        return
    with pytest.raises(SettingError, match=rf"model\.head_init\.classes.*{message}"):
        assemble(cfg)


def test_weights_without_their_head_are_refused_naming_the_setting(source, tmp_path):
    cfg = compose_config(source_overrides(source, tmp_path / "run", f"model.weights={source['backbone']}"))
    with pytest.raises(SettingError, match=r"model.head_init.from=source .* but model.weights=.*backbone.pth holds no"):
        assemble(cfg)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.weights=null"], r"model.head_init.from=source .* model.weights=null"),
        (["pretrained_weights=null"], r"model.head_init.from=source .* model.weights=null"),
        (["experiment=scratch"], r"model.head_init.from=source .* model.weights=null"),
        (["model.head_init.classes=null"], r"model.head_init.from=source needs model.head_init.classes"),
        (["model.head_init.from=xavier"], r"model.head_init.classes is only read with model.head_init.from=source"),
        (["model.head_init.from=imagenet"], r"Unknown model.head_init.from='imagenet'"),
        (["model.head_init.classes={hot_dog:rest,not_hot_dog:rest}"], r"at most one class"),
        (["model.head_init.classes={hot_dog:[934],not_hot_dog:[934,1]}"], r"source index 934 for both"),
        (["model.head_init.classes={hot_dog:934,not_hot_dog:rest}"], r"model.head_init.classes.hot_dog=934"),
        (["model.head_init.classes={hot_dog:[-1],not_hot_dog:rest}"], r"model.head_init.classes.hot_dog=\[-1\]"),
    ],
)
def test_head_init_settings_are_checked_before_anything_is_built(source, tmp_path, extra, message):
    with pytest.raises(SettingError, match=message):
        check_settings(compose_config(source_overrides(source, tmp_path / "run", *extra)))


def test_zero_epochs_are_refused_without_the_source_head(source, tmp_path):
    overrides = tiny_overrides(source["root"], tmp_path / "run") + ["trainer.max_epochs=0"]
    with pytest.raises(SettingError, match=r"trainer.max_epochs must be .* got 0.*model.head_init.from=source"):
        check_settings(compose_config(overrides))
    check_settings(compose_config(source_overrides(source, tmp_path / "zero", "trainer.max_epochs=0")))


def test_the_librarys_pretrained_weights_give_their_head_torchvision(source, tmp_path, monkeypatch):
    """Offline, torchvision's weights API reads the file already in $TORCH_HOME/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (checkpoints / url.rsplit("/", 1)[1]).write_bytes(source["full"].read_bytes())
    head_init = {"from": "source", "classes": {"hot_dog": [HOT_DOG, 1], "not_hot_dog": "rest"}}
    head = build_backbone("resnet18", 2, weights="imagenet", head_init=head_init).head
    assert torch.allclose(head.weight[0], source["net"].fc.weight[[HOT_DOG, 1]].mean(0), atol=1e-6)


def test_the_librarys_pretrained_weights_give_their_head_timm(monkeypatch):
    real = timm.create_model

    def seeded(name, pretrained=False, **kwargs):  # stands in for the download (offline here): the same weights
        torch.manual_seed(0)
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", seeded)
    reference = seeded("resnet18.a1_in1k")
    head_init = {"from": "source", "classes": {"a": [3], "b": [7]}}
    head = build_backbone("timm/resnet18.a1_in1k", 2, weights="imagenet", head_init=head_init).head
    assert torch.equal(head.weight, reference.fc.weight[[3, 7]]) and torch.equal(head.bias, reference.fc.bias[[3, 7]])


@pytest.mark.slow
@needs_shared(MOBILENET_V2_WEIGHTS)
def test_the_real_backbone_only_mobilenet_file_is_refused_for_a_source_head():
    head_init = {"from": "source", "classes": {"hot_dog": [HOT_DOG], "not_hot_dog": "rest"}}
    with pytest.raises(SettingError, match=r"model.weights=.*mobilenet_v2-imagenet-features.pth holds no classifier"):
        build_backbone("mobilenet_v2", 2, weights=MOBILENET_V2_WEIGHTS, head_init=head_init)


@pytest.mark.slow
@needs_shared(EFFICIENTNET_LITE2_WEIGHTS, KAGGLE_HOTDOG)
def test_efficientnet_lite2s_imagenet_hotdog_row_tells_hot_dogs_apart_zero_shot():
    from PIL import Image

    from finetune.backbones import preprocessing
    from finetune.data.transforms import Preprocessing

    head_init = {"from": "source", "classes": {"hot_dog": [HOT_DOG], "not_hot_dog": "rest"}}
    built = build_backbone("timm/tf_efficientnet_lite2", 2, weights=EFFICIENTNET_LITE2_WEIGHTS, head_init=head_init)
    state = torch.load(EFFICIENTNET_LITE2_WEIGHTS, map_location="cpu", weights_only=True)
    assert torch.equal(built.head.weight[0], state["classifier.weight"][HOT_DOG])
    settings = preprocessing("timm/tf_efficientnet_lite2")
    assert (settings["image_size"], settings["resize_size"], settings["interpolation"]) == (260, 292, "bicubic")
    transform = Preprocessing.of(**settings).transform()
    folders = [KAGGLE_HOTDOG / "test" / "hot_dog", KAGGLE_HOTDOG / "test" / "not_hot_dog"]
    photos = [(p, c) for c, folder in enumerate(folders) for p in sorted(folder.iterdir())[:10]]
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in photos])
    with torch.no_grad():
        predicted = built.model.eval()(batch).argmax(dim=1)
    accuracy = (predicted == torch.tensor([c for _, c in photos])).float().mean().item()
    assert accuracy >= 0.7  # 0.854 on all 500 test photos; chance is 0.5
