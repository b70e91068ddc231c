"""trainer.run.optim: no decay on biases and norms; layer-wise LR decay by depth; the schedule."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from trainer.config import TrainConfig
from trainer.run.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups

LR = 1e-3


@pytest.fixture(scope="module")
def bert_classifier(tiny_bert):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)


def settings_by_name(model, cfg: TrainConfig) -> dict[str, dict]:
    """For each parameter name, the lr and weight decay of the group holding it."""
    groups = parameter_groups(model, cfg)
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {name: by_id[id(param)] for name, param in model.named_parameters()}


def test_every_trainable_parameter_is_in_exactly_one_group(bert_classifier):
    groups = parameter_groups(bert_classifier, TrainConfig(layerwise_lr_decay=0.8))
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in bert_classifier.parameters()}


def test_frozen_parameters_are_left_out(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    for param in model.bert.embeddings.parameters():
        param.requires_grad_(False)
    ids = {id(p) for g in parameter_groups(model, TrainConfig()) for p in g["params"]}
    assert not ids & {id(p) for p in model.bert.embeddings.parameters()}


def test_no_weight_decay_on_biases_and_layer_norms(bert_classifier):
    cfg = TrainConfig(weight_decay=0.05)
    settings = settings_by_name(bert_classifier, cfg)
    norms = [n for n in settings if "LayerNorm" in n]
    biases = [n for n in settings if n.endswith(".bias")]
    assert norms and biases
    for name, group in settings.items():
        expected = 0.0 if name in norms or name in biases else 0.05
        assert group["weight_decay"] == expected, name
    assert settings["bert.encoder.layer.0.attention.self.query.weight"]["weight_decay"] == 0.05
    assert settings["bert.embeddings.word_embeddings.weight"]["weight_decay"] == 0.05
    assert settings["classifier.weight"]["weight_decay"] == 0.05


def test_without_layerwise_decay_every_group_has_the_peak_lr(bert_classifier):
    groups = parameter_groups(bert_classifier, TrainConfig(lr=LR))
    assert {g["lr"] for g in groups} == {LR}
    assert len(groups) == 2  # decay and no-decay


def test_layerwise_lr_decay_by_depth(bert_classifier):
    decay = 0.5
    layers = bert_classifier.config.num_hidden_layers
    settings = settings_by_name(bert_classifier, TrainConfig(lr=LR, layerwise_lr_decay=decay))
    for name, group in settings.items():
        if name.startswith("bert.embeddings."):
            expected = LR * decay ** (layers + 1)
        elif name.startswith("bert.encoder.layer."):
            index = int(name.split(".")[3])
            expected = LR * decay ** (layers - index)
        else:  # pooler and classifier: the head
            assert name.startswith(("bert.pooler.", "classifier."))
            expected = LR
        assert group["lr"] == pytest.approx(expected), name
    assert settings["bert.embeddings.LayerNorm.weight"]["weight_decay"] == 0.0
    assert settings["bert.encoder.layer.1.output.dense.weight"]["lr"] == pytest.approx(LR * 0.5)


def test_layerwise_lr_decay_for_gpt2(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    settings = settings_by_name(model, TrainConfig(lr=LR, layerwise_lr_decay=0.5))
    assert settings["transformer.wte.weight"]["lr"] == pytest.approx(LR * 0.5**3)
    assert settings["transformer.wpe.weight"]["lr"] == pytest.approx(LR * 0.5**3)
    assert settings["transformer.h.0.attn.c_attn.weight"]["lr"] == pytest.approx(LR * 0.5**2)
    assert settings["transformer.h.1.mlp.c_fc.weight"]["lr"] == pytest.approx(LR * 0.5)
    assert settings["transformer.ln_f.weight"]["lr"] == pytest.approx(LR)
    assert settings["transformer.ln_f.weight"]["weight_decay"] == 0.0
    assert settings["transformer.h.0.ln_1.weight"]["weight_decay"] == 0.0


def test_optimizer_starts_groups_at_their_own_lr(bert_classifier):
    optimizer = build_optimizer(bert_classifier, TrainConfig(lr=LR, layerwise_lr_decay=0.5))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx(
        [LR * 0.125, LR * 0.25, LR * 0.5, LR]
    )


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_warmup_then_decay(bert_classifier, scheduler):
    cfg = TrainConfig(lr=LR, warmup_ratio=0.1, scheduler=scheduler)
    optimizer = build_optimizer(bert_classifier, cfg)
    schedule = build_scheduler(optimizer, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(LR * 0.5)
    assert lrs[10] == pytest.approx(LR)
    if scheduler == "constant":
        assert lrs[99] == pytest.approx(LR)
    else:
        assert lrs[99] < LR * 0.05
        assert all(a >= b for a, b in pairwise(lrs[10:]))


def test_adamw_is_fused_on_cpu_and_falls_back_to_foreach_elsewhere(bert_classifier):
    fused = build_optimizer(bert_classifier, TrainConfig(lr=LR))
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    on_meta = torch.nn.Linear(4, 4, device="meta")
    fallback = build_optimizer(on_meta, TrainConfig(lr=LR))
    assert fallback.defaults["foreach"] and not fallback.defaults["fused"]


@pytest.mark.parametrize(
    ("scheduler", "hf_name"),
    [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup")],
)
def test_schedules_match_transformers(scheduler, hf_name):
    """Our schedule formulas are transformers' (written out to keep its import cost away)."""
    from transformers import get_scheduler

    total, warmup = 37, 4
    reference = get_scheduler(
        hf_name,
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
        num_warmup_steps=warmup,
        num_training_steps=total,
    )
    factor = lr_factor(scheduler, warmup, total)
    for step in range(total + 2):
        assert factor(step) == pytest.approx(reference.lr_lambdas[0](step), abs=1e-12), step
