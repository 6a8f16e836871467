import functools

import pytest
import pytorch_lightning as pl
import torch

from finetune.data import ImageFolderDataModule
from finetune.harness.settings import check_model_settings
from finetune.module import FineTuneModule


def _module(**kwargs) -> FineTuneModule:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.01, weight_decay=1e-4))
    return FineTuneModule(num_classes=2, backbone="resnet18", weights=None, **kwargs)


def _groups(module: FineTuneModule) -> dict[str, tuple[float, set[int]]]:
    optimizer = module.configure_optimizers()
    return {g["name"]: (g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups}


def test_finetune_gives_the_head_ten_times_the_backbone_lr():
    module = _module(head_lr_mult=10)
    groups = _groups(module)
    head_ids = {id(p) for p in module.net.fc.parameters()}
    assert groups["head"] == (pytest.approx(0.1), head_ids)
    assert groups["backbone"][0] == pytest.approx(0.01)
    assert groups["backbone"][1] == {id(p) for p in module.net.parameters()} - head_ids
    assert module.configure_optimizers().param_groups[0]["weight_decay"] == 1e-4


def test_scratch_uses_one_group_at_one_lr():
    groups = _groups(_module(head_lr_mult=1))
    assert list(groups) == ["all"] and groups["all"][0] == pytest.approx(0.01)
    assert len(groups["all"][1]) == len(list(_module().net.parameters()))


def test_frozen_backbone_optimises_only_the_head():
    module = _module(freeze="backbone", head_lr_mult=10)
    groups = _groups(module)
    assert list(groups) == ["head"] and groups["head"] == (
        pytest.approx(0.1),
        {id(p) for p in module.net.fc.parameters()},
    )
    assert all(not p.requires_grad for p in module.backbone_parameters())


def test_cosine_scheduler_keeps_the_lr_ratio():
    scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4)
    config = _module(scheduler=scheduler).configure_optimizers()
    optimizer, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    optimizer.step()
    sched.step()
    backbone, head = (g["lr"] for g in optimizer.param_groups)
    assert head == pytest.approx(10 * backbone) and backbone < 0.01


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="Unknown freeze mode 'layers'.*none.*backbone"):
        check_model_settings({"freeze": "layers"})
    with pytest.raises(ValueError, match="head_lr_mult must be > 0"):
        check_model_settings({"head_lr_mult": 0})


def test_predict_step_returns_class_probabilities():
    module = _module().eval()
    probabilities = module.predict_step((torch.randn(3, 3, 32, 32), torch.zeros(3)), 0)
    assert probabilities.shape == (3, 2)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(3)) and (probabilities >= 0).all()


def test_frozen_training_changes_only_the_head_and_no_batchnorm_statistic(tiny_folder):
    module = _module(freeze="backbone", head_lr_mult=10)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    datamodule = ImageFolderDataModule(tiny_folder, batch_size=4, num_workers=0, val_fraction=0.2, image_size=32)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)  # train -> validate -> train: every mode switch Lightning makes

    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.fc.weight", "net.fc.bias"}
    batchnorms = module.frozen_batchnorms()
    assert len(batchnorms) == 20 and all(not bn.training for bn in batchnorms)
    assert module.net.layer1.training  # the rest of the network is in train mode as usual


def test_groups_carry_an_lr_scale_that_the_optimizer_applies_once():
    module = _module(head_lr_mult=10)
    assert [(g["name"], g["lr_scale"]) for g in module.parameter_groups()] == [("backbone", 1.0), ("head", 10)]
    optimizer = module.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.01), pytest.approx(0.1)]
    assert "lr" not in module.parameter_groups()[0]  # the groups never read the factory's lr


def test_a_batch_of_the_wrong_shape_fails_loudly_in_either_input_mode():
    images_mode = _module()
    with pytest.raises(ValueError, match=r"input_mode='images' takes 4-D batches, got shape \(2, 512\)"):
        images_mode(torch.randn(2, 512))
    features_mode = _module(freeze="backbone", cache_features=True)
    assert features_mode(torch.randn(2, 512)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"input_mode='features' takes 2-D batches, got shape \(2, 3, 32, 32\)"):
        features_mode(torch.randn(2, 3, 32, 32))
