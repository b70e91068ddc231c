"""Adapter folders open with the standard tools (trainer/model/labelled_base.py), and
checkpoints open with `trainer evaluate` and `trainer export --checkpoint` mid-run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, write_csv
from interrupted_runs import cli, stop_in_process
from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification, pipeline

from trainer.inference import Predictor
from trainer.run.checkpoint import saved_layout
from trainer.run.resume import COMMIT_NAME, read_loop_state

LABELS = ["negative", "neutral", "positive"]
CUES = {"negative": "awful", "neutral": "room", "positive": "great"}
TEXT = "the staff were great and the room was quiet ."


def three_label_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(LABELS)
        words = rng.choices(["the", "film", "was", "a", "hotel", "in", "Paris"], k=5)
        words.insert(rng.randint(0, 5), CUES[label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("three")
    train = write_csv(folder / "train.csv", three_label_rows(64, 1))
    return train, write_csv(folder / "validation.csv", three_label_rows(24, 2))


def lora_run(make, files, **sections) -> dict:
    train, validation = files
    return make(
        "classification",
        data={"train": str(train), "validation": str(validation)},
        peft={"method": "lora", "options": {"init_lora_weights": False}},
        **sections,
    )


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tokenizer([TEXT], return_tensors="pt")).logits


def test_the_three_standard_loaders_keep_labels_and_logits(run_config, three_labels, tmp_path):
    """pipeline, AutoPeftModel and PeftModel on the base the adapter names: the run's three
    label names, and our Predictor's logits (the pooler, which the MLM base lacks, is
    saved with the adapter instead of drawn again)."""
    assert cli("train", lora_run(run_config, three_labels, train={"max_steps": 3})) == 0
    final = tmp_path / "run" / "final"
    assert not (final / "config.json").exists()  # else transformers looks for full weights
    links = list((final / "base").glob("weights-*.safetensors"))
    assert links and all(link.is_symlink() for link in links)  # the original's, not copies
    ours = Predictor.load(str(final))
    expected = logits(ours.model, ours.tokenizer)
    id2label = dict(enumerate(LABELS))

    classify = pipeline("text-classification", model=str(final), top_k=None)
    assert classify.model.config.id2label == id2label
    assert torch.allclose(logits(classify.model, ours.tokenizer), expected, atol=1e-5)
    scores = {row["label"]: row["score"] for row in classify([TEXT])[0]}
    predicted = ours.predict([TEXT])[0]["probabilities"]
    assert scores == pytest.approx(predicted, abs=1e-5)

    auto = AutoPeftModelForSequenceClassification.from_pretrained(str(final))
    assert auto.config.id2label == id2label
    assert torch.allclose(logits(auto, ours.tokenizer), expected, atol=1e-5)

    base_path = PeftConfig.from_pretrained(str(final)).base_model_name_or_path
    base = AutoModelForSequenceClassification.from_pretrained(base_path)
    peft_model = PeftModel.from_pretrained(base, str(final))
    assert peft_model.config.id2label == id2label
    assert torch.allclose(logits(peft_model, ours.tokenizer), expected, atol=1e-5)


def test_token_classification_adapter_in_a_pipeline(run_config, tmp_path):
    config = run_config("token-classification", peft={"method": "lora"}, train={"max_steps": 3})
    assert cli("train", config) == 0
    final = tmp_path / "run" / "final"
    ours = Predictor.load(str(final))
    tagger = pipeline("token-classification", model=str(final))
    assert tagger.model.config.id2label == dict(enumerate(ours.label_names))
    assert torch.allclose(
        logits(tagger.model, ours.tokenizer), logits(ours.model, ours.tokenizer), atol=1e-5
    )
    assert isinstance(tagger("Alice visited Paris"), list)


def test_checkpoints_open_mid_run(run_config, three_labels, tmp_path, capsys):
    """A run stopped after step 4 (no final/): its checkpoint of step 2 scores what the run's
    own evaluation at step 2 scored, and exports (adapter and merged) that score the same."""
    sections = {
        "eval": {"every_steps": 2, "batch_size": 16},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
        "train": {"epochs": 3},
    }
    config = lora_run(run_config, three_labels, **sections)
    stop_in_process(config, 4)  # exits 75 (preempted), checkpoint step-4 written
    run_dir = tmp_path / "run"
    assert not (run_dir / "final").exists()
    validation = str(three_labels[1])
    logged = next(r for r in read_metrics(run_dir) if r.get("step") == 2 and "eval_loss" in r)
    capsys.readouterr()

    def scored(folder) -> dict:
        assert cli("evaluate", folder, "--data", validation) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    checkpoint_dir = run_dir / "checkpoints" / "step-00000002"
    manifest = json.loads((checkpoint_dir / COMMIT_NAME).read_text())["files"]
    base_files = [name for name in manifest if "/base/" in name]
    assert base_files and not [name for name in base_files if "weights-" in name]  # not ours
    checkpoint = scored(checkpoint_dir)
    assert checkpoint["loss"] == pytest.approx(logged["eval_loss"], abs=1e-6)
    assert checkpoint["f1"] == pytest.approx(logged["eval_f1"], abs=1e-6)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli("export", run_dir, "--checkpoint", "step-2", "--out", adapter) == 0
    assert cli("export", run_dir, "--checkpoint", "2", "--out", merged, "--merge") == 0
    capsys.readouterr()
    assert scored(adapter) == checkpoint
    assert all(link.is_symlink() for link in (adapter / "base").glob("weights-*"))
    assert scored(merged)["loss"] == pytest.approx(checkpoint["loss"], abs=1e-4)
    assert cli("export", run_dir, "--checkpoint", "step-9", "--out", tmp_path / "x") == 2


def test_checkpoint_state_is_not_named_like_hf_trainers(run_config, tmp_path):
    """loop_state.json, not trainer_state.json (HF Trainer's, another schema); a checkpoint
    written with the old name still reads."""
    config = run_config("classification", train={"max_steps": 2}, checkpoint={"every_steps": 2})
    assert cli("train", config) == 0
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert (folder / "loop_state.json").is_file()
    assert not (folder / "trainer_state.json").exists()
    (folder / "loop_state.json").rename(folder / "trainer_state.json")
    assert read_loop_state(folder)["loop"]["step"] == 2
    assert saved_layout(folder) == (1, "ddp")
