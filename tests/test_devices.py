"""Device choice (trainer/devices.py): a machine without CUDA but with another accelerator
(Apple MPS, Intel XPU) trains and predicts on it; only a machine with none falls back to the
CPU. The accelerators are simulated by patching torch's availability checks; what is checked
is the argument Accelerate gets and the device a Predictor computes on."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from trainer.config import build_config
from trainer.inference import Predictor
from trainer.run import setup

KINDS = [("mps", "mps"), ("xpu", "xpu"), (None, "cpu")]


@pytest.fixture
def only(monkeypatch):
    """`only(kind)`: pretend that `kind` ('mps', 'xpu' or None) is this machine's only
    accelerator (no CUDA)."""

    def pretend(kind: str | None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: kind == "mps")
        monkeypatch.setattr(torch.xpu, "is_available", lambda: kind == "xpu")

    return pretend


class _Built(Exception):
    """Raised by the stand-in Accelerator once it has seen its arguments."""


@pytest.mark.parametrize(("kind", "device"), KINDS)
def test_training_leaves_the_device_to_accelerate_where_an_accelerator_is(
    monkeypatch, only, tmp_path, kind, device
):
    only(kind)
    seen = {}

    def accelerator(**kwargs):
        seen.update(kwargs)
        raise _Built

    monkeypatch.setattr(setup, "Accelerator", accelerator)
    cfg = build_config({"task": "classification", "model": {"name_or_path": "m"}}, False)
    with pytest.raises(_Built):
        setup.make_accelerator(cfg, tmp_path, 1)
    assert seen["cpu"] is (device == "cpu")


@pytest.mark.parametrize(("kind", "device"), KINDS)
def test_a_predictor_computes_on_the_accelerator_that_is_there(
    monkeypatch, only, tiny_bert, bert_tokenizer, kind, device
):
    only(kind)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    moved = []
    monkeypatch.setattr(model, "to", lambda target: moved.append(target) or model)
    cfg = build_config({"task": "classification", "model": {"name_or_path": "m"}}, False)
    predictor = Predictor(model, bert_tokenizer, cfg)
    assert predictor.device == torch.device(device)
    assert moved == [torch.device(device)]
