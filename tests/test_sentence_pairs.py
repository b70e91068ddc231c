"""mlm.next_sentence: BERT pretraining with MLM + next-sentence prediction (NSP).

Pairs are drawn half true, half random and never wrongly; the collator masks them as MLM
blocks are masked; one optimizer step equals an SGD step on BertForPreTraining's own
loss (MLM mean + NSP mean), with or without accumulation; a tiny model trains through the
CLI with both losses logged and falling, resumes exactly, and leaves a final/ that loads
with AutoModelForPreTraining and scores again with `trainer evaluate`."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import make_run_config, read_metrics, reset_accelerate, write_config
from interrupted_runs import (
    assert_same_tensors,
    comparable,
    final_weights,
    signal_at_step,
)
from transformers import AutoModelForPreTraining

from trainer.cli import main
from trainer.config import DataConfig, MlmConfig
from trainer.data.collate import MaskedLMCollator, SentencePairCollator
from trainer.data.encode import IGNORE_INDEX
from trainer.data.read import TEXT, Split, read_split
from trainer.data.sampling import KeyedDataset
from trainer.data.sentence_pairs import draw_pairs, encode_sentence_pairs, split_sentences
from trainer.errors import UserError
from trainer.run.step import optimizer_step
from trainer.run.stop import EXIT_PREEMPTED
from trainer.tasks.mlm import pretraining

TOPICS = (  # words of the tiny BERT's vocabulary, one set per kind of document
    "patient doctor hospital pain fever treatment dose severe mild daily",
    "film movie loved hated boring amazing awful good great bad",
    "hotel room staff service food Paris London Berlin visited really",
)


def documents(count: int, seed: int) -> list[str]:
    """Documents of 2-4 sentences, each document on one topic."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        words = rng.choice(TOPICS).split()
        sentences = []
        for _ in range(rng.randint(2, 4)):
            text = " ".join(rng.choices(words, k=rng.randint(3, 6)))
            sentences.append(text[0].upper() + text[1:] + ".")
        docs.append(" ".join(sentences))
    return docs


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def nsp_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nsp-data")
    (folder / "train.txt").write_text("\n".join(documents(24, seed=1)) + "\n")
    (folder / "validation.txt").write_text("\n".join(documents(12, seed=2)) + "\n")
    return folder


def nsp_config(folder: Path, models: dict, data: Path, **sections) -> Path:
    """MLM + NSP on the tiny BERT (its MLM checkpoint; the NSP head starts random)."""
    updates = {
        "mlm": {"next_sentence": True},
        "data": {"train": str(data / "train.txt"), "validation": str(data / "validation.txt")},
        # no head warm-up (mlm's default with a new NSP head): these tests are about the
        # two losses of one step; tests/test_head_warmup.py tests the warm-up
        "train": {
            **{"epochs": 20, "global_batch_size": 8, "micro_batch_size": 4, "lr": 5e-3},
            "head_warmup_ratio": 0.0,
        },
        "log": {"every_steps": 4, "trackers": []},
        "eval": {"every_steps": 40},
    }
    for section, values in sections.items():
        updates.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    return make_run_config(folder, "mlm", models, data, **updates)


# --- sentences and pairs -------------------------------------------------------------------


def test_sentences_end_at_punctuation_before_a_capital_or_digit():
    text = 'Seen at 09:30. NIHSS 9! Was it? "Yes." e.g. not here. 12 mg given.'
    assert split_sentences(text) == [
        "Seen at 09:30.",
        "NIHSS 9!",
        "Was it?",
        '"Yes." e.g. not here.',
        "12 mg given.",
    ]
    assert split_sentences("  one sentence without an end  ") == ["one sentence without an end"]


def test_pairs_are_half_random_and_never_the_true_next():
    docs = [[f"d{d}s{s}" for s in range(random.Random(d).randint(1, 6))] for d in range(400)]
    pairs = draw_pairs(docs, seed=7)
    assert len(pairs) == sum(len(d) - 1 for d in docs)
    share = sum(p.is_random for p in pairs) / len(pairs)
    assert 0.46 < share < 0.54, share
    for pair in pairs:
        (doc, index), second = pair.first, pair.second
        assert second != pair.first
        if pair.is_random:
            assert second[0] != doc  # from another document: neither itself nor its successor
        else:
            assert second == (doc, index + 1)


def test_pairs_follow_the_seed():
    docs = [[f"d{d}s{s}" for s in range(3)] for d in range(50)]
    assert draw_pairs(docs, seed=1) == draw_pairs(docs, seed=1)
    assert draw_pairs(docs, seed=1) != draw_pairs(docs, seed=2)


def split_of(texts: list[str]) -> Split:
    return Split(
        "data.train", [{"text": t} for t in texts], [f"line {i}" for i in range(len(texts))]
    )


def test_encoded_pairs_carry_segments_and_labels(bert_tokenizer):
    examples = encode_sentence_pairs(split_of(documents(30, seed=3)), bert_tokenizer, 32, seed=0)
    assert set(examples["next_sentence_label"]) == {0, 1}
    for example in examples:
        ids, types = example["input_ids"], example["token_type_ids"]
        assert len(ids) <= 32
        tokens = bert_tokenizer.convert_ids_to_tokens(ids)
        first_sep = tokens.index("[SEP]")
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        assert example["special_tokens_mask"] == [int(t in ("[CLS]", "[SEP]")) for t in tokens]


def test_documents_of_one_sentence_are_an_error(bert_tokenizer):
    with pytest.raises(UserError, match="no document holds two sentences"):
        encode_sentence_pairs(split_of(["One sentence.", "Another one."]), bert_tokenizer, 32, 0)
    with pytest.raises(UserError, match="at least two documents"):
        encode_sentence_pairs(split_of(["One. Two."]), bert_tokenizer, 32, 0)


def test_collator_masks_each_pair_as_mlm_does_and_pads(bert_tokenizer):
    examples = encode_sentence_pairs(split_of(documents(30, seed=3)), bert_tokenizer, 32, seed=0)
    keyed = KeyedDataset(examples, run_seed=0)
    items = [keyed[(0, i)] for i in range(6)]
    masking = MaskedLMCollator(bert_tokenizer, MlmConfig(mask_probability=0.3))
    batch = SentencePairCollator(masking)(items)
    assert batch["next_sentence_label"].tolist() == [e["next_sentence_label"] for e in items]
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        ids, labels = masking.mask(item)  # the same seeded draw as an MLM block
        assert batch["input_ids"][row, :length].tolist() == ids.tolist()
        assert batch["labels"][row, :length].tolist() == labels.tolist()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (
            batch["input_ids"].shape[1] - length
        )
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert batch["token_type_ids"][row, :length].tolist() == item["token_type_ids"]
    special = batch["input_ids"] == bert_tokenizer.sep_token_id
    assert (batch["labels"][special] == IGNORE_INDEX).all()


# --- the optimizer step is BERT's pretraining loss -----------------------------------------


def sgd_step(model_dir: Path, window: list[dict], accumulation: int):
    """One `optimizer_step` of the pretraining spec with SGD at lr 1: the update is minus
    the gradient, so any difference in normalisation shows in the weights."""
    reset_accelerate()
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    torch.manual_seed(0)
    model = AutoModelForPreTraining.from_pretrained(model_dir).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    sums = optimizer_step(model, window, pretraining(0), accelerator, optimizer, scheduler, 0)
    return accelerator.unwrap_model(model).state_dict(), sums.sums


def test_step_is_an_sgd_step_on_bert_pretraining_loss(tiny_bert, bert_tokenizer):
    examples = encode_sentence_pairs(split_of(documents(30, seed=3)), bert_tokenizer, 32, seed=0)
    keyed = KeyedDataset(examples, run_seed=0)
    batch = SentencePairCollator(MaskedLMCollator(bert_tokenizer, MlmConfig()))(
        [keyed[(0, i)] for i in range(8)]
    )
    torch.manual_seed(0)
    reference = AutoModelForPreTraining.from_pretrained(tiny_bert).eval()
    reference(**batch).loss.backward()  # HF: mean MLM loss + mean NSP loss
    with torch.no_grad():
        for param in reference.parameters():
            param -= param.grad
    expected = reference.state_dict()
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    for window, accumulation in (([batch], 1), (halves, 2)):
        weights, sums = sgd_step(tiny_bert, window, accumulation)
        assert max((weights[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
        # [mlm loss sum, mlm targets, tokens, grad norm, positions, nsp loss sum, nsp targets]
        assert sums.targets.item() == (batch["labels"] != IGNORE_INDEX).sum().item()
        assert sums.head_targets[0].item() == 8


# --- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nsp_run(tmp_path_factory, tiny_models_by_task, nsp_data) -> Path:
    folder = tmp_path_factory.mktemp("nsp-run")
    assert cli("train", nsp_config(folder, tiny_models_by_task, nsp_data)) == 0
    return folder / "run"


def test_both_losses_are_logged_and_fall(nsp_run):
    records = [r for r in read_metrics(nsp_run) if "loss" in r]
    for record in records:
        assert record["loss"] == pytest.approx(record["mlm_loss"] + record["nsp_loss"])
    for key in ("mlm_loss", "nsp_loss"):
        values = [r[key] for r in records]
        first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
        assert last < first, (key, values)


def test_evaluation_reports_nsp_accuracy(nsp_run):
    evaluations = [r for r in read_metrics(nsp_run) if "eval_loss" in r]
    assert evaluations
    for record in evaluations:
        assert 0 <= record["eval_nsp_accuracy"] <= 1
        assert record["eval_loss"] == pytest.approx(
            record["eval_mlm_loss"] + record["eval_nsp_loss"]
        )
    results = json.loads((nsp_run / "eval_results.json").read_text())
    assert results["metric"] == "perplexity"


def test_final_loads_as_bert_for_pretraining_and_scores_again(nsp_run, nsp_data, capsys):
    model = AutoModelForPreTraining.from_pretrained(nsp_run / "final")
    assert type(model).__name__ == "BertForPreTraining"
    capsys.readouterr()
    assert cli("evaluate", nsp_run / "final", "--data", nsp_data / "validation.txt") == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((nsp_run / "eval_results.json").read_text())
    for key in ("nsp_accuracy", "nsp_loss", "mlm_loss", "perplexity"):
        assert results[key] == pytest.approx(saved[key], rel=1e-5), key


def test_resumed_nsp_run_equals_the_uninterrupted_one(
    tmp_path, tiny_models_by_task, nsp_data, monkeypatch
):
    sections = {
        "train": {"epochs": 2},
        "log": {"every_steps": 2},
        "checkpoint": {"every_steps": 2},
        "eval": {"every_steps": 3},
    }
    whole = nsp_config(tmp_path / "whole", tiny_models_by_task, nsp_data, **sections)
    assert cli("train", whole) == 0
    split = nsp_config(tmp_path / "split", tiny_models_by_task, nsp_data, **sections)
    # saves after step 5, between logs: the unlogged MLM and NSP sums go into the checkpoint
    signal_at_step(monkeypatch, 4, signal.SIGTERM)
    assert cli("train", split) == EXIT_PREEMPTED
    monkeypatch.undo()
    assert cli("train", split) == 0
    assert comparable(tmp_path / "split" / "run") == comparable(tmp_path / "whole" / "run")
    assert_same_tensors(
        final_weights(tmp_path / "split" / "run"), final_weights(tmp_path / "whole" / "run")
    )


# --- bad configurations --------------------------------------------------------------------


def test_next_sentence_with_clm_is_one_line(run_config, capsys):
    assert cli("train", run_config("clm", mlm={"next_sentence": True})) == 2
    err = capsys.readouterr().err
    assert err == "error: mlm.next_sentence: only with task mlm (task is 'clm')\n"


def test_next_sentence_with_lora_is_refused(run_config, capsys):
    config = run_config("mlm", mlm={"next_sentence": True}, peft={"method": "lora"})
    assert cli("train", config) == 2
    assert "mlm.next_sentence: the pretraining heads train in full" in capsys.readouterr().err


def test_architecture_without_nsp_head_is_one_line(tmp_path, bert_tokenizer, capsys):
    from transformers import RobertaConfig, RobertaForMaskedLM

    folder = tmp_path / "roberta"
    config = RobertaConfig(
        vocab_size=len(bert_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    RobertaForMaskedLM(config).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    (tmp_path / "pairs.txt").write_text("\n".join(documents(10, seed=4)) + "\n")
    raw = {
        "task": "mlm",
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(folder)},
        "mlm": {"next_sentence": True},
        "data": {"train": str(tmp_path / "pairs.txt"), "max_length": 32},
        "train": {"max_steps": 1, "global_batch_size": 4, "micro_batch_size": 4},
        "log": {"trackers": []},
    }
    assert cli("train", write_config(tmp_path / "c.yaml", raw)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mlm.next_sentence: roberta models have no next-sentence head")
    assert err.count("\n") == 1


def test_nsp_metrics_may_pick_the_best_model():
    from trainer.config import build_config

    raw = {
        "task": "mlm",
        "model": {"name_or_path": "m"},
        "data": {"train": "t.txt"},
        "mlm": {"next_sentence": True},
        "eval": {"metric": "nsp_accuracy"},
    }
    assert build_config(raw, world_size=1).eval_metric == "nsp_accuracy"
    with pytest.raises(UserError, match=r"eval\.metric: 'nsp_accuracy' is not one of"):
        build_config({**raw, "mlm": {}}, world_size=1)


def test_data_config_reads_documents_per_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("One. Two.\n\nThree. Four.\n")
    rows = read_split(str(path), "data.train", TEXT, DataConfig()).rows
    assert [split_sentences(r["text"]) for r in rows] == [["One.", "Two."], ["Three.", "Four."]]
