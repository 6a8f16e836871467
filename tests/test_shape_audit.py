"""scripts/shape_audit.py: whether a photo's shape gives its class away, counted from image headers."""

import importlib.util
import json

import numpy as np
from PIL import Image

from .conftest import REPO

spec = importlib.util.spec_from_file_location("shape_audit", REPO / "scripts" / "shape_audit.py")
shape_audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shape_audit)


def make_shaped_folder(root, shapes):
    """``shapes[split][class]``: a list of (width, height), one image each."""
    for split, classes in shapes.items():
        for name, sizes in classes.items():
            (root / split / name).mkdir(parents=True)
            for i, (width, height) in enumerate(sizes):
                Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_the_shape_rule_is_fitted_on_train_and_scored_on_each_split(tmp_path, capsys):
    root = make_shaped_folder(
        tmp_path / "data",
        {
            "train": {"dog": [(40, 40)] * 6 + [(40, 30)] * 2, "cat": [(40, 30)] * 5 + [(30, 40)] * 2 + [(40, 40)]},
            "test": {"dog": [(40, 40)] * 2 + [(40, 30)] * 2, "cat": [(40, 30)] * 4},
        },
    )
    report = shape_audit.audit(root)
    assert report["counts"]["train"]["dog"] == {"square": 6, "landscape": 2}
    assert report["counts"]["train"]["cat"] == {"landscape": 5, "portrait": 2, "square": 1}
    assert report["rule"] == {"square": "dog", "landscape": "cat", "portrait": "cat"}
    assert report["rule_accuracy"] == {"train": 13 / 16, "test": 6 / 8}
    assert report["prior_accuracy"] == {"train": 0.5, "test": 0.5}

    out = tmp_path / "report.json"
    assert shape_audit.main([str(root), "--json", str(out)]) == 0
    assert "train: the shape rule is right on 0.812 of the photos" in capsys.readouterr().out
    assert json.loads(out.read_text())["rule"]["square"] == "dog"


def test_a_folder_without_splits_is_named(tmp_path, capsys):
    assert shape_audit.main([str(tmp_path)]) == 2
    assert "has no train/ folder" in capsys.readouterr().err
