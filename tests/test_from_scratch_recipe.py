"""The shipped from-scratch recipe end to end on a generated corpus and the tiny BERT's
architecture: `trainer tokenizer train` -> MLM + NSP pretraining with that tokenizer ->
classification fine-tuning from the pretrained final/, all through the CLI."""

from __future__ import annotations

import json

from conftest import REPO, read_metrics, reset_accelerate
from test_sentence_pairs import documents
from transformers import AutoModelForPreTraining, AutoModelForSequenceClassification, AutoTokenizer

from trainer.cli import main

TINY = "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}"


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def test_tokenizer_then_pretraining_then_fine_tuning(tmp_path, tiny_bert, data_dir, capsys):
    corpus, validation = tmp_path / "docs.txt", tmp_path / "docs_validation.txt"
    corpus.write_text("\n".join(documents(60, seed=11)) + "\n")
    validation.write_text("\n".join(documents(12, seed=12)) + "\n")
    tokenizer_dir = tmp_path / "wordpiece"
    code = cli("tokenizer", "train", corpus, "--type", "wordpiece", "--vocab-size", 120,
               "--out", tokenizer_dir)  # fmt: skip
    assert code == 0
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))

    pretraining = REPO / "configs" / "bert-from-scratch-pretraining.yaml"
    assert cli(
        "train", pretraining,
        f"output_dir={tmp_path / 'pretrained'}",
        f"model.name_or_path={tiny_bert}",  # the architecture; the weights start random
        f"model.tokenizer={tokenizer_dir}",
        f"model.config_overrides={TINY}",
        f"data.train={corpus}", f"data.validation={validation}", "data.max_length=32",
        "train.epochs=4", "train.global_batch_size=8", "train.micro_batch_size=8",
        "train.lr=5e-3", "eval.every_steps=0", "log.every_steps=5", "log.trackers=[]",
    ) == 0  # fmt: skip
    pretrained = tmp_path / "pretrained" / "final"
    model = AutoModelForPreTraining.from_pretrained(pretrained)
    assert type(model).__name__ == "BertForPreTraining"
    assert model.get_input_embeddings().num_embeddings == vocab_size  # sized to the tokenizer
    assert len(AutoTokenizer.from_pretrained(pretrained)) == vocab_size
    logged = [r for r in read_metrics(tmp_path / "pretrained") if "nsp_loss" in r]
    assert logged and logged[-1]["mlm_loss"] < logged[0]["mlm_loss"]

    fine_tuning = REPO / "configs" / "bert-from-scratch-finetune.yaml"
    assert cli(
        "train", fine_tuning,
        f"output_dir={tmp_path / 'classifier'}",
        f"data.train={data_dir / 'sentiment_train.csv'}",
        f"data.validation={data_dir / 'sentiment_validation.csv'}",
        f"model.name_or_path={pretrained}",
        # The trained vocabulary varies from run to run (the tokenizers library's WordPiece
        # trainer breaks ties in hash-map order, huggingface/tokenizers#1794), and so does the
        # pretrained encoder. With 4 epochs some of them left the tiny classifier at chance;
        # with 10 epochs and the recipe's 10% warm-up 1 in 15 still sat on the chance plateau
        # until the last epoch (0.42). Without warm-up, 13 vocabularies (that one included)
        # all scored 0.92 to 0.96.
        "train.epochs=10", "train.lr=3e-3", "train.warmup_ratio=0", "log.trackers=[]",
    ) == 0  # fmt: skip
    classifier = tmp_path / "classifier" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(classifier)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert len(AutoTokenizer.from_pretrained(classifier)) == vocab_size
    results = json.loads((tmp_path / "classifier" / "eval_results.json").read_text())
    assert results["accuracy"] >= 0.7  # the cue words are in the domain vocabulary
