"""Adapters of different tasks on one loaded base: a LoRA classifier, a LoRA NER tagger and
a LoRA masked LM trained on the tiny BERT, served by one Predictor. Each adapter predicts
what its own folder predicts alone, the base's weights are held once (same storage), the CLI
switches between tasks, and an adapter of another base is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_run_config, reset_accelerate, write_csv

from trainer.cli import main
from trainer.errors import UserError
from trainer.inference import Predictor
from trainer.model import shared_base
from trainer.model.labelled_base import BASE_DIR, ORIGINAL_KEY

SENTENCES = [
    "the film was really good .",
    "bad",
    "Alice visited Paris and London with Bob after the treatment .",
    "terrible service , the staff at Acme Corp were boring and the room awful .",
    "the [MASK] was good .",
    "[MASK] visited [MASK] with Bob",
]
LORA = {"peft": {"method": "lora"}, "data": {"validation": None}}
TASKS = {"sst": "classification", "ner": "token-classification", "mlm": "mlm"}


def train_lora(root: Path, task: str, models: dict, data_dir: Path, seed: int) -> Path:
    """A tiny LoRA run through the CLI (48 steps: the tagger finds entities); returns its
    final/."""
    folder = root / task
    folder.mkdir(parents=True)
    reset_accelerate()
    train = {"epochs": 1, "max_steps": 48, "lr": 2e-2, "seed": seed}
    config = make_run_config(folder, task, models, data_dir, train=train, **LORA)
    assert main(["train", str(config)]) == 0
    return folder / "run" / "final"


@pytest.fixture(scope="module")
def finals(tmp_path_factory, tiny_models_by_task, data_dir) -> dict[str, Path]:
    """One LoRA final/ per task on the tiny BERT (different seeds: each draws its own
    pooler/head, which the shared base must not mix up)."""
    root = tmp_path_factory.mktemp("multitask")
    return {
        name: train_lora(root, task, tiny_models_by_task, data_dir, seed)
        for seed, (name, task) in enumerate(TASKS.items())
    }


@pytest.fixture(scope="module")
def alone(finals) -> dict[str, Predictor]:
    return {name: Predictor.load(str(folder)) for name, folder in finals.items()}


@pytest.fixture(scope="module")
def shared(finals) -> Predictor:
    """The classifier's final/ (its adapter named `sst`), the tagger and the masked LM."""
    predictor = Predictor.load(str(finals["sst"]), adapter_name="sst")
    predictor.add_adapter("ner", str(finals["ner"]))
    predictor.add_adapter("mlm", str(finals["mlm"]))
    return predictor


def logits(predictor: Predictor) -> torch.Tensor:
    encoded = predictor.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return predictor.model(**encoded).logits


def assert_rows_equal(got: list[dict], want: list[dict]) -> None:
    """Labels, entity spans and fill tokens identical; every score to 1e-5 (the zips are
    strict: as many rows, entities and masks on both sides)."""
    for row, expected in zip(got, want, strict=True):
        assert row.keys() == expected.keys()
        if "label" in row:
            assert row["label"] == expected["label"]
            assert row["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
        for found, wanted in zip(
            row.get("entities", []), expected.get("entities", []), strict=True
        ):
            assert found == {**wanted, "score": pytest.approx(wanted["score"], abs=1e-5)}
        for fills, wanted in zip(row.get("fills", []), expected.get("fills", []), strict=True):
            assert [f["token_id"] for f in fills] == [f["token_id"] for f in wanted]
            scores = [f["score"] for f in wanted]
            assert [f["score"] for f in fills] == pytest.approx(scores, abs=1e-5)


def test_each_adapter_predicts_as_its_folder_alone(shared, alone):
    assert shared.adapter_names == ["sst", "ner", "mlm"]
    assert len(shared.models) == 3  # one model per task class
    rows_alone = {name: predictor.predict(SENTENCES) for name, predictor in alone.items()}
    assert rows_alone["sst"][0].keys() == {"label", "score", "probabilities"}
    assert rows_alone["ner"][2]["entities"], "the tagger finds entities"
    for name in ["ner", "mlm", "sst", "mlm", "ner", "sst"]:  # back and forth, no reload
        shared.use(name)
        assert shared.task == TASKS[name]
        torch.testing.assert_close(logits(shared), logits(alone[name]), atol=1e-5, rtol=0)
        assert_rows_equal(shared.predict(SENTENCES), rows_alone[name])


def test_the_base_weights_are_held_once(shared, alone):
    backbones = [model.get_base_model().base_model for model in shared.models]
    names = ["embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"]
    names.append("encoder.layer.0.attention.self.query.base_layer.weight")  # under LoRA
    for name in names:
        pointers = {dict(b.named_parameters())[name].data_ptr() for b in backbones}
        assert len(pointers) == 1, name
    # the MLM decoder, tied to the embeddings, follows them to the shared weights
    mlm = shared.served["mlm"].model.get_base_model()
    embeddings = backbones[0].embeddings.word_embeddings.weight
    assert mlm.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()
    together = shared_base.parameter_bytes(shared.models)
    apart = sum(shared_base.parameter_bytes([p.model]) for p in alone.values())
    base = sum(p.numel() * p.element_size() for p in shared.backbone.values())
    assert base > 0.7 * together  # the tiny base is most of it; heads and LoRA the rest
    assert apart - together == 2 * base  # the second and third base are not held at all


def test_share_backbone_refuses_other_weights(finals, tiny_bert):
    from transformers import AutoModelForTokenClassification

    first = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=3)
    other = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=3)
    with torch.no_grad():
        other.bert.encoder.layer[0].output.dense.weight.add_(1e-3)
    backbone = shared_base.backbone_parameters(first)
    with pytest.raises(UserError, match=r"--adapter x=y: its base's weights differ .*layer\.0"):
        shared_base.share_backbone(other, backbone, "--adapter x=y")
    assert shared_base.share_backbone(first, backbone, "-") > 0  # its own weights: all shared


def test_a_head_of_another_size_gets_its_own_model(finals, tiny_models_by_task, data_dir, tmp_path):
    """A 3-label classifier next to the 2-label one: peft cannot put heads of two shapes in
    one model, so it gets a model of its own, on the same base weights."""
    from conftest import sentiment_rows

    rows = sentiment_rows(96, seed=7)
    rows += [{"text": "the hotel room was quite mild .", "label": "neutral"}] * 24
    three = write_csv(tmp_path / "three.csv", rows)
    folder = tmp_path / "sst3"
    folder.mkdir()
    reset_accelerate()
    train = {"epochs": 1, "max_steps": 12, "lr": 2e-2, "seed": 5}
    sections = {**LORA, "data": {**LORA["data"], "train": str(three)}}
    config = make_run_config(
        folder, "classification", tiny_models_by_task, data_dir, train=train, **sections
    )
    assert main(["train", str(config)]) == 0
    predictor = Predictor.load(str(finals["sst"]), adapter_name="sst")
    predictor.add_adapter("sst3", str(folder / "run" / "final"))
    assert len(predictor.models) == 2
    first, second = (model.get_base_model().bert for model in predictor.models)
    name = "encoder.layer.0.attention.self.value.base_layer.weight"
    assert (
        dict(first.named_parameters())[name].data_ptr()
        == dict(second.named_parameters())[name].data_ptr()
    )
    predictor.use("sst3")
    alone = Predictor.load(str(folder / "run" / "final"))
    assert list(predictor.predict(SENTENCES)[0]["probabilities"]) == [
        "negative",
        "neutral",
        "positive",
    ]
    assert_rows_equal(predictor.predict(SENTENCES), alone.predict(SENTENCES))


def test_a_base_in_another_dtype_is_refused(tiny_bert):
    from transformers import AutoModelForTokenClassification

    first = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=3)
    half = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=3).bfloat16()
    backbone = shared_base.backbone_parameters(first)
    with pytest.raises(UserError, match=r"--adapter x=y: its base's .* is torch.bfloat16 \["):
        shared_base.share_backbone(half, backbone, "--adapter x=y")


def cli(capsys, *argv) -> tuple[int, str]:
    reset_accelerate()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_serves_each_task_from_one_base(finals, tiny_bert, tmp_path, capsys):
    source = write_csv(tmp_path / "in.csv", [{"text": text} for text in SENTENCES])
    adapters = [f"--adapter={name}={folder}" for name, folder in finals.items()]
    for name, folder in finals.items():
        want, got = tmp_path / f"{name}-alone.jsonl", tmp_path / f"{name}-shared.jsonl"
        assert cli(capsys, "predict", folder, "--input", source, "--output", want)[0] == 0
        argv = ["predict", tiny_bert, "--input", source, "--output", got, *adapters]
        code, err = cli(capsys, *argv, "--use", name)
        assert code == 0, err
        assert_rows_equal(read_rows(got), read_rows(want))
    assert "entities" in read_rows(tmp_path / "ner-shared.jsonl")[0]


def test_an_adapter_of_another_base_is_refused(finals, tiny_bert, tmp_path, capsys):
    moved = tmp_path / "other-base-ner"
    shutil.copytree(finals["ner"], moved)
    index = next((moved / BASE_DIR).glob("*.index.json"))
    recorded = json.loads(index.read_text())
    recorded["metadata"][ORIGINAL_KEY] = str(tmp_path / "another-bert")
    index.write_text(json.dumps(recorded))
    source = write_csv(tmp_path / "in.csv", [{"text": "Alice visited Paris"}])
    out = tmp_path / "out.jsonl"
    argv = ["predict", finals["sst"], "--input", source, "--output", out]
    code, err = cli(capsys, *argv, "--adapter", f"ner={moved}", "--use", "ner")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"--adapter ner={moved}: trained on {tmp_path / 'another-bert'}, not " in err
    assert not out.exists()


def test_the_input_is_read_with_the_used_adapters_settings(finals, tmp_path, capsys):
    """`--use ner` reads the input's text from the tagger's `data.text_column`, not from the
    first adapter's (a run trained on another column of another task)."""
    import yaml

    from trainer.model.saved import RUN_CONFIG_NAME

    tagger = tmp_path / "ner-sentence-column"
    shutil.copytree(finals["ner"], tagger)
    settings = yaml.safe_load((tagger / RUN_CONFIG_NAME).read_text())
    settings["data"]["text_column"] = "sentence"
    (tagger / RUN_CONFIG_NAME).write_text(yaml.safe_dump(settings))
    source = write_csv(tmp_path / "in.csv", [{"sentence": SENTENCES[2]}])
    out = tmp_path / "out.jsonl"
    argv = ["predict", finals["sst"], "--input", source, "--output", out]
    code, err = cli(capsys, *argv, "--adapter", f"ner={tagger}", "--use", "ner")
    assert code == 0, err
    assert read_rows(out)[0]["entities"]
