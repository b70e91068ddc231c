"""final/README.md: the model card a finished run writes (full model and LoRA adapter), the
card `trainer export` writes, and `trainer export --push-to-hub` up to the upload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_run_config, reset_accelerate
from huggingface_hub import ModelCard

import trainer.run.train
from trainer.cli import main
from trainer.model.card import CardFacts, model_card


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def scores(card: ModelCard) -> dict[str, float]:
    """The card's model-index metrics, by name."""
    return {result.metric_type: result.metric_value for result in card.data.eval_results}


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The scores in eval_results.json (its per-class lists and step numbers left out)."""
    results = json.loads((run_dir / "eval_results.json").read_text())
    return {k: v for k, v in results.items() if isinstance(v, float)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models_by_task, data_dir):
    """`finished(name, task, **sections)`: a tiny run trained once per module (its run dir)."""
    runs: dict[str, Path] = {}

    def run(name: str, task: str, **sections) -> Path:
        if name not in runs:
            folder = tmp_path_factory.mktemp(name)
            config = make_run_config(folder, task, tiny_models_by_task, data_dir, **sections)
            assert cli("train", config) == 0
            runs[name] = folder / "run"
        return runs[name]

    return run


def test_a_full_model_run_leaves_a_card_the_hub_parses(finished, data_dir, tiny_bert):
    run_dir = finished("full", "classification", train={"max_steps": 3})
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.tags == ["steadytrain", "classification"]
    assert card.data.base_model is None  # a local folder: the Hub takes ids only
    assert f"fine-tuned from `{tiny_bert}`" in card.text
    assert scores(card) == final_metrics(run_dir) and "accuracy" in scores(card)
    (result,) = {(r.dataset_name, r.dataset_split) for r in card.data.eval_results}
    assert result == ("sentiment_validation.csv", "validation")
    assert f"| `{data_dir / 'sentiment_train.csv'}` | train | 192 |" in card.text
    assert f"| `{data_dir / 'sentiment_validation.csv'}` | validation | 48 |" in card.text
    assert (run_dir / "config.yaml").read_text() in card.text  # the resolved config
    assert f'pipeline("text-classification", model="{run_dir / "final"}")' in card.text


def test_a_lora_run_leaves_a_peft_card(finished, tiny_bert):
    run_dir = finished("lora", "token-classification", peft={"method": "lora"})
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.pipeline_tag == "token-classification"
    assert card.data.tags == ["steadytrain", "token-classification", "lora"]
    assert scores(card) == final_metrics(run_dir) and "f1" in scores(card)
    assert "PeftModel.from_pretrained(base, " in card.text
    assert f'AutoModelForTokenClassification.from_pretrained("{tiny_bert}", id2label=' in card.text


def card_of(config: dict, results: dict | None = None, library: str = "transformers"):
    facts = CardFacts(config, results, None, library)
    return ModelCard(str(model_card(facts, "me/tiny", "tiny")))  # parsed back, as the Hub does


def test_hub_ids_are_metadata_and_local_paths_are_not(tmp_path):
    config = {
        "task": "classification",
        "model": {"name_or_path": "google-bert/bert-base-uncased"},
        "data": {
            "train": ["stanfordnlp/imdb", str(tmp_path / "extra.csv")],
            "validation": "stanfordnlp/imdb:test",
        },
    }
    card = card_of(config, {"accuracy": 0.9, "loss": 0.3, "best_step": 4, "metric": "accuracy"})
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.datasets == ["stanfordnlp/imdb"]
    (result,) = {(r.dataset_type, r.dataset_split) for r in card.data.eval_results}
    assert result == ("stanfordnlp/imdb", "test")
    assert scores(card) == {"accuracy": 0.9, "loss": 0.3}


def test_the_license_comes_from_the_base_models_own_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    config = {"task": "mlm", "model": {"name_or_path": str(base)}, "data": {"train": "a.txt"}}
    assert card_of(config).data.license is None
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    assert card_of(config).data.license == "mit"
    assert (
        card_of({**config, "model": {"name_or_path": str(base), "from_scratch": True}}).data.license
        is None
    )


def test_a_kill_before_the_card_leaves_a_finish_the_restart_completes(run_config, tmp_path, capfd):
    config, run_dir = run_config("classification", train={"max_steps": 3}), tmp_path / "run"

    def killed(folder, card):
        raise KeyboardInterrupt  # a SIGKILL stand-in: eval_results.json is written, no card

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.run.train, "write_card", killed)
        with pytest.raises(KeyboardInterrupt):
            cli("train", config)
    assert (run_dir / "eval_results.json").is_file() and (run_dir / "best").is_dir()
    assert not (run_dir / "final").exists(), "final/ appears only with its card"
    capfd.readouterr()
    assert cli("train", config) == 0
    assert (
        f"completed the interrupted finish of {run_dir}: best/ is final/" in capfd.readouterr().err
    )
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert scores(card) == final_metrics(run_dir) and card.data.library_name == "transformers"
