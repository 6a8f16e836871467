"""+callbacks=compile: clean checkpoints that load, resume and evaluate uncompiled; a clear fallback where it fails.

Most tests compile with dynamo's ``eager`` backend (graph capture, no code generation): what they check - the
state_dict keys, the fallback, the checkpoint's life after the run - does not depend on the backend, and inductor
needs minutes per graph on a small shared CPU. ``test_inductor_compiles_a_tiny_resnet`` (slow) runs the real one.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from finetune import backbones
from finetune.callbacks.compile import compile_network
from finetune.evaluate import evaluate
from finetune.module import FineTuneModule
from finetune.run import assemble
from finetune.scoring import Scorer
from finetune.train import train

from .conftest import compose_config, tiny_overrides

pytestmark = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unsupported here")
FALLBACK = "callbacks.compile: torch.compile fails here"


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile as the run calls it, with dynamo's eager backend (no C++ compile)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_a_compiled_runs_checkpoint_loads_resumes_and_evaluates_uncompiled(tmp_path, tiny_folder, eager_backend):
    overrides = tiny_overrides(tiny_folder, tmp_path / "compiled") + ["+callbacks=compile", "trainer.max_epochs=1"]
    cfg = compose_config(overrides)
    run = assemble(cfg)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.model.compiled and run.model.net._compiled_call_impl is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the network really went through dynamo

    ckpt = tmp_path / "compiled" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not [key for key in saved["state_dict"] if "_orig_mod" in key]
    assert "compile" not in saved["hyper_parameters"]  # how a run executes the net is not part of the model

    plain = FineTuneModule.load_from_checkpoint(ckpt, weights_only=True)  # strict: every key matches
    assert not getattr(plain, "compiled", False) and plain.net._compiled_call_impl is None
    assert saved["state_dict"].keys() == plain.state_dict().keys()
    images = torch.randn(2, 3, 32, 32)
    run.model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(run.model(images), plain(images), atol=1e-5)

    resumed = train(
        compose_config(
            tiny_overrides(tiny_folder, tmp_path / "resumed") + ["trainer.max_epochs=2", f"ckpt_path={ckpt}"]
        )
    )
    assert resumed["status"] == "completed" and [e["epoch"] for e in resumed["history"]] == [1]
    continued = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (continued["epoch"], continued["global_step"]) == (1, 8)  # 4 steps of the compiled run, then 4 more
    eval_overrides = ["data=folder", f"data.root={tiny_folder}", "data.image_size=32", "data.resize_size=36"]
    eval_overrides += ["data.num_workers=0", "trainer.accelerator=cpu", f"paths.output_dir={tmp_path / 'eval'}"]
    evaluated = evaluate(compose_config([*eval_overrides, f"ckpt_path={ckpt}"], config_name="eval"))
    # The compiled model's own test of the same weights (eager backend: the same arithmetic).
    run.model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    expected = run.trainer.test(Scorer(run.model), datamodule=run.datamodule)[0]
    assert evaluated["test/acc"] == pytest.approx(expected["test/acc"])
    assert evaluated["test/loss"] == pytest.approx(expected["test/loss"], rel=1e-5)


def test_compile_refused_at_once_is_said_once_and_the_run_runs_uncompiled(tmp_path, tiny_folder, monkeypatch, caplog):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    overrides = tiny_overrides(tiny_folder, tmp_path / "run") + ["+callbacks=compile", "trainer.max_epochs=1"]
    with caplog.at_level(logging.WARNING):
        run = assemble(compose_config(overrides))
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert not run.model.compiled
    messages = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert len(messages) == 1 and "Dynamo is not supported on this Python" in messages[0]
    assert run.trainer.current_epoch == 1  # it trained


def test_compile_failing_at_the_first_step_falls_back_once(tmp_path, tiny_folder, monkeypatch, caplog):
    calls = []

    def broken_compile(fn, *args, **kwargs):
        def compiled(*a, **k):
            calls.append(1)
            raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    overrides = tiny_overrides(tiny_folder, tmp_path / "run") + ["+callbacks=compile", "trainer.max_epochs=1"]
    with caplog.at_level(logging.WARNING):
        run = assemble(compose_config(overrides))
        run.trainer.fit(run.model, datamodule=run.datamodule)  # compiling is lazy: it fails at the first forward
    assert not run.model.compiled and run.model.net._compiled_call_impl is None
    assert len(calls) == 1  # tried once, then eager for every later step
    messages = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert len(messages) == 1 and "No working C++ compiler" in messages[0]
    assert run.trainer.current_epoch == 1


def test_a_real_error_in_the_network_is_not_taken_for_a_compile_failure(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    model = FineTuneModule(num_classes=2, weights=None)
    assert compile_network(model) and model.compiled
    with pytest.raises(Exception, match="channels|size|shape|Expected"):
        model(torch.randn(2, 5, 32, 32))  # 5 channels: wrong for the first convolution, compiled or not
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiles_a_tiny_network(tmp_path, tiny_folder, monkeypatch):
    """The real backend (a C compiler is needed on a CPU): a few steps, then the same logits as eager. A two-layer
    network: inductor's C++ compile of a ResNet-18's training graph alone took ~45 s of CI's time."""
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile worker processes
    monkeypatch.setattr(backbones, "FAMILIES", {"tiny/": "tests.tiny_family", **backbones.FAMILIES})
    torch._dynamo.reset()
    overrides = tiny_overrides(tiny_folder, tmp_path / "run") + [
        "model.backbone=tiny/cnn",
        "+callbacks=compile",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=0",
        "~callbacks.model_checkpoint",
    ]
    run = assemble(compose_config(overrides))
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.model.compiled, "inductor failed here; the run fell back to eager"
    eager = FineTuneModule(num_classes=2, backbone="tiny/cnn", weights=None)
    eager.load_state_dict(run.model.state_dict())
    images = torch.randn(4, 3, 32, 32)
    run.model.train(), eager.train()  # the graph compiled during fit, no recompilation for eval mode
    assert torch.allclose(run.model(images), eager(images), atol=1e-4)
    torch._dynamo.reset()
