"""trainer.model.carried: the base-model tensors of a source checkpoint that the run's
model has no place for (the pooler, which transformers' masked-LM classes drop) come out
of an MLM run unchanged in final/ and in a checkpoint's model/, so that a classifier
fine-tuned from them starts from the pretrained pooler, as one from the source does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_run_config
from interrupted_runs import cli
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)

from trainer.config import ModelConfig
from trainer.model import carried
from trainer.model.load import load_model, load_tokenizer
from trainer.run.checkpoint import CARRIED_SHARDS
from trainer.tasks.registry import TASKS

POOLER = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")
RUN = {
    "train": {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 4, "lr": 5e-3},
    "eval": {"every_steps": 0},
    "checkpoint": {"every_steps": 4, "keep_last": 1},
}


def _save(model: torch.nn.Module, tokenizer_from: Path, folder: Path) -> Path:
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pooled_bert(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT as a `BertModel` with a pooler (as all-MiniLM-L6-v2 ships), the pooler
    drawn from a fixed seed."""
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("pooled-bert")
    return _save(AutoModel.from_pretrained(tiny_bert), tiny_bert, folder)


def _pooler_of(folder: Path) -> dict[str, torch.Tensor]:
    """The source's pooler tensors, under the names a BERT with a head saves them."""
    weights = load_file(folder / "model.safetensors")
    return {f"bert.{key}": tensor for key, tensor in weights.items() if "pooler" in key}


def _last_checkpoint_model(run_dir: Path) -> Path:
    """The model/ of the run's newest checkpoint (rotation keeps one)."""
    (folder,) = (run_dir / "checkpoints").glob("step-*")
    return folder / "model"


def _mlm(folder: Path) -> torch.nn.Module:
    cfg = ModelConfig(name_or_path=str(folder))
    return load_model(cfg, TASKS["mlm"], load_tokenizer(cfg, TASKS["mlm"]))


def _classifier(folder: Path) -> tuple[torch.nn.Module, dict]:
    return AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, output_loading_info=True
    )


def test_an_mlm_run_keeps_the_source_pooler(tmp_path, pooled_bert, tiny_gpt2, data_dir):
    source = _pooler_of(pooled_bert)
    assert set(source) == set(POOLER)
    models = {"bert": pooled_bert, "clm": tiny_gpt2}
    assert cli("train", make_run_config(tmp_path, "mlm", models, data_dir, **RUN)) == 0
    run_dir = tmp_path / "run"
    for folder in (run_dir / "final", _last_checkpoint_model(run_dir)):
        model, info = _classifier(folder)
        assert not [key for key in info["missing_keys"] if "pooler" in key]
        assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
        for name, tensor in source.items():
            assert torch.equal(model.state_dict()[name], tensor), (folder, name)
    # the encoder did train: the carried pooler is the source's, not a copy of the model
    final = load_file(run_dir / "final" / "model.safetensors")
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(final[query], load_file(pooled_bert / "model.safetensors")[query[5:]])
    # the checkpoint still links its weights (stored once) and writes only the pooler
    linked = _last_checkpoint_model(run_dir) / CARRIED_SHARDS[0]
    assert linked.stat().st_nlink == 2
    assert set(load_file(linked.with_name(CARRIED_SHARDS[1]))) == set(POOLER)


def test_a_source_without_pooler_writes_nothing_extra(tmp_path, tiny_bert, tiny_gpt2, data_dir):
    model = _mlm(tiny_bert)
    assert carried.tensors(model) == {}
    own = set(model.state_dict())
    models = {"bert": tiny_bert, "clm": tiny_gpt2}
    assert cli("train", make_run_config(tmp_path, "mlm", models, data_dir, **RUN)) == 0
    run_dir = tmp_path / "run"
    final = load_file(run_dir / "final" / "model.safetensors")
    assert set(final) <= own and not [key for key in final if "pooler" in key]
    checkpoint_model = _last_checkpoint_model(run_dir)
    assert sorted(path.name for path in checkpoint_model.glob("*.safetensors*")) == [
        "model.safetensors"
    ]


def test_only_base_model_tensors_are_carried(tmp_path, pooled_bert):
    """A classifier checkpoint loaded for MLM: its pooler (the base model's) is carried, its
    classifier (another task's head) is not; a base-model checkpoint's names get the
    prefix."""
    torch.manual_seed(3)
    classifier = BertForSequenceClassification.from_pretrained(pooled_bert, num_labels=3)
    folder = _save(classifier, pooled_bert, tmp_path / "classifier")
    from_classifier = carried.tensors(_mlm(folder))
    assert set(from_classifier) == set(POOLER)
    for name, tensor in from_classifier.items():
        assert torch.equal(tensor, classifier.state_dict()[name])
    from_base = carried.tensors(_mlm(pooled_bert))
    assert from_base.keys() == from_classifier.keys()
    assert all(torch.equal(from_base[k], from_classifier[k]) for k in from_base)


def test_a_merged_lora_export_keeps_the_source_pooler(tmp_path, pooled_bert, tiny_gpt2, data_dir):
    """LoRA leaves the pooler to final/base/ (the source's own files); merging writes a
    standalone model, which carries it too."""
    models = {"bert": pooled_bert, "clm": tiny_gpt2}
    lora = {**RUN, "peft": {"method": "lora", "r": 4}, "checkpoint": {"every_steps": 0}}
    assert cli("train", make_run_config(tmp_path, "mlm", models, data_dir, **lora)) == 0
    assert cli("export", tmp_path / "run", "--merge", "--out", tmp_path / "merged") == 0
    model, info = _classifier(tmp_path / "merged")
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    for name, tensor in _pooler_of(pooled_bert).items():
        assert torch.equal(model.state_dict()[name], tensor), name
