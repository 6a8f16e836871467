"""``features.store=DIR``: a later run with the same frozen backbone reads each image's features instead of computing
them, and gets what computing gives; a changed image or other weights are computed anew."""

from __future__ import annotations

import os

import torch

from finetune import features as features_module
from finetune.run import assemble, compose_config

from .conftest import make_image_folder, tiny_overrides


def cached_features(root, out, store, extra=()):
    overrides = ["experiment=frozen", "features=cached", f"features.store={store}", "model.weights=null", *extra]
    run = assemble(compose_config(tiny_overrides(root, out) + overrides))
    run.datamodule.setup("fit")
    return run.datamodule.features("val"), run.datamodule.features("train")


def test_a_second_run_reads_the_stored_features_and_they_equal_computed_ones(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", n_train=10, n_test=2)
    computed = []
    original = features_module.extract_features

    def counting(model, dataset, *args, **kwargs):
        computed.append(len(dataset))
        return original(model, dataset, *args, **kwargs)

    monkeypatch.setattr(features_module, "extract_features", counting)
    torch.manual_seed(1)
    val, train = cached_features(root, tmp_path / "a", tmp_path / "store")
    assert computed == [4, 16]
    torch.manual_seed(1)
    plain_val, _ = cached_features(root, tmp_path / "plain", "null")  # no store: computed as always
    assert computed == [4, 16, 4, 16]
    torch.testing.assert_close(val.tensors[0], plain_val.tensors[0])
    torch.manual_seed(1)
    again_val, again_train = cached_features(root, tmp_path / "b", tmp_path / "store", ["data.shots=3"])
    assert computed == [4, 16, 4, 16]  # the same backbone: nothing computed, the few-shot draw included
    torch.testing.assert_close(again_val.tensors[0], val.tensors[0])
    assert again_val.tensors[1].tolist() == val.tensors[1].tolist() and len(again_train) == 6
    changed = next((root / "train" / "cat").iterdir())
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    torch.manual_seed(1)
    cached_features(root, tmp_path / "c", tmp_path / "store")
    assert computed[4:] == [1]  # only the touched image, in whichever split holds it
    torch.manual_seed(2)  # other random weights: another store file, everything computed
    cached_features(root, tmp_path / "d", tmp_path / "store")
    assert computed[-2:] == [4, 16] and len(list((tmp_path / "store").glob("features-*.pt"))) == 2


def test_decoded_images_in_memory_have_no_file_to_store_by_and_are_computed(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=6, n_test=2)
    val, _ = cached_features(root, tmp_path / "a", tmp_path / "store", ["data.cache=memory"])
    assert len(val) == 2 and not (tmp_path / "store").exists()
