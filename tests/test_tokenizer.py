"""trainer.commands.tokenizer and trainer.model.vocabulary: `trainer tokenizer train` gives a
tokenizer of each kind that AutoTokenizer loads; `trainer tokenizer extend` adds the words
the documented rule ranks first; a run with an extended tokenizer starts each new
embedding row at the mean of the rows of the pieces it replaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_run_config, read_metrics, reset_accelerate
from transformers import AutoModelForMaskedLM, AutoTokenizer

from trainer.cli import main
from trainer.commands.tokenizer import tokens_per_word, train_tokenizer
from trainer.config import ModelConfig
from trainer.model import vocabulary
from trainer.model.load import load_model, load_tokenizer
from trainer.tasks.registry import TASKS

DOMAIN = REPO / "data" / "text" / "domain.txt"


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def domain_texts() -> list[str]:
    return [line for line in DOMAIN.read_text().splitlines() if line.strip()]


# --- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_trained_tokenizer_round_trips_through_auto_tokenizer(kind, domain_texts, tmp_path):
    trained = train_tokenizer(domain_texts, kind, 600)
    trained.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 600
    text = "Ultrasound-guided liver biopsy showed steatohepatitis with stage 2 fibrosis."
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == trained(text, add_special_tokens=False)["input_ids"]
    expected = text.lower() if kind == "wordpiece" else text  # BERT-style lower-cases
    assert loaded.decode(ids).replace(" - ", "-").replace(" .", ".") == expected
    if loaded.unk_token is not None:  # the text is from the corpus: nothing is unknown
        assert loaded.unk_token_id not in ids


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_mlm_tokenizers_have_bert_specials_and_pair_segments(kind, domain_texts):
    tokenizer = train_tokenizer(domain_texts, kind, 400)
    for name in ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"):
        assert getattr(tokenizer, name) is not None, name
    encoded = tokenizer("Chest pain.", "Troponin negative.", return_token_type_ids=True)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == tokenizer.cls_token and tokens[-1] == tokenizer.sep_token
    first_sep = tokens.index(tokenizer.sep_token)
    assert set(encoded["token_type_ids"][: first_sep + 1]) == {0}
    assert set(encoded["token_type_ids"][first_sep + 1 :]) == {1}


def test_bpe_is_gpt2_style(domain_texts):
    tokenizer = train_tokenizer(domain_texts, "bpe", 400)
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.convert_ids_to_tokens(tokenizer(" fever")["input_ids"])[0].startswith("Ġ")
    # byte-level: characters never seen in training still encode without an unknown token
    assert tokenizer.decode(tokenizer("naïve 漢字")["input_ids"]) == "naïve 漢字"


def test_tokens_per_word_counts_pieces_per_whitespace_word(bert_tokenizer):
    # the tiny BERT keeps words of up to 4 letters whole and cuts longer ones in 4s
    assert tokens_per_word(bert_tokenizer, ["the dose", "hospital ."]) == pytest.approx(5 / 4)


def test_train_command_saves_and_compares_with_the_reference(tmp_path, tiny_bert, capsys):
    out = tmp_path / "tok"
    code = cli(
        "tokenizer", "train", DOMAIN, "--type", "wordpiece", "--vocab-size", 500,
        "--out", out, "--reference", tiny_bert,
    )  # fmt: skip
    assert code == 0
    result = last_json(capsys.readouterr().out)
    assert result["vocab_size"] == 500 and result["texts_measured"] == 403
    assert len(AutoTokenizer.from_pretrained(out)) == 500
    # a tokenizer fitted to the domain needs fewer pieces per word than a generic tiny one
    assert result["tokens_per_word"] < result["reference_tokens_per_word"]


def test_train_command_reads_a_run_config_and_defaults_to_its_model(
    tmp_path, tiny_models_by_task, data_dir, capsys
):
    config = make_run_config(tmp_path, "classification", tiny_models_by_task, data_dir)
    assert cli("tokenizer", "train", config, "--type", "unigram", "--vocab-size", 120,
               "--out", tmp_path / "tok") == 0  # fmt: skip
    result = last_json(capsys.readouterr().out)
    assert result["texts_measured"] == 192  # the rows of data.train
    assert result["reference"] == str(tiny_models_by_task["bert"])


def test_unloadable_reference_is_skipped(tmp_path, capsys):
    code = cli("tokenizer", "train", DOMAIN, "--type", "bpe", "--vocab-size", 300,
               "--out", tmp_path / "tok", "--reference", tmp_path / "missing")  # fmt: skip
    assert code == 0
    out, err = capsys.readouterr()
    assert "warning: reference tokenizer skipped: --reference: could not load" in err
    assert "reference_tokens_per_word" not in last_json(out)


def test_a_config_only_reference_is_skipped_not_scored_zero(tmp_path, capsys):
    """transformers builds an empty tokenizer from a folder with only a config.json (the
    shipped tiny GPT-2): it is no reference, not one at 0 tokens per word."""
    config_only = REPO / "configs/models/tiny-gpt2"
    code = cli("tokenizer", "train", DOMAIN, "--type", "bpe", "--vocab-size", 300,
               "--out", tmp_path / "tok", "--reference", config_only)  # fmt: skip
    assert code == 0
    out, err = capsys.readouterr()
    assert f"warning: reference tokenizer skipped: {config_only} has no vocabulary" in err
    assert "reference_tokens_per_word" not in last_json(out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "missing.txt", "--type", "bpe", "--vocab-size", "300"],
            "CORPUS: file not found",
        ),
        (["train", "nothing-*.txt", "--type", "bpe", "--vocab-size", "300"], "file not found"),
        (["train", str(DOMAIN), "--type", "spm", "--vocab-size", "300"], "--type: 'spm'"),
        (["train", str(DOMAIN), "--type", "bpe", "--vocab-size", "1"], "--vocab-size: 1"),
        (["extend", "tok", "--corpus", "missing.txt", "--add", "3"], "--corpus: file not found"),
        (["extend", "tok", "--corpus", str(DOMAIN), "--add", "0"], "--add: must be > 0"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("tokenizer", *argv, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_out_folder_with_files_is_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code = cli("tokenizer", "train", DOMAIN, "--type", "bpe", "--vocab-size", 300,
               "--out", tmp_path)  # fmt: skip
    assert code == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


# --- extension -----------------------------------------------------------------------------

# On the tiny BERT vocabulary (words of up to 4 letters whole, longer ones in 4-letter
# pieces, unknown words letter by letter): pieces - 1 and the frequency in CORPUS.
EXTENSION_CORPUS = [
    "Sepsis after treatment .",  # sepsis: 6 pieces x 3 = 15 saved; treatment: 3 pieces
    "sepsis and treatment in hospital .",  # hospital: 2 pieces x 4 = 4 saved
    "SEPSIS with fever and treatment .",  # treatment x 4 = 8 saved
    "hospital hospital hospital fever treatment .",  # fever: 2 pieces x 2 = 2 saved
    "severe pain daily .",  # severe, daily: frequency 1, below the minimum of 2
]


@pytest.fixture
def extended(tiny_bert, tmp_path, capsys) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(EXTENSION_CORPUS) + "\n")
    out = tmp_path / "extended"
    assert cli("tokenizer", "extend", tiny_bert, "--corpus", corpus, "--add", 3, "--out", out) == 0
    return out


def test_extension_adds_the_words_that_save_the_most_tokens(extended, bert_tokenizer, capsys):
    out = capsys.readouterr().out
    record = json.loads((extended / vocabulary.EXTENSION_FILE).read_text())
    assert [t["token"] for t in record["tokens"]] == ["sepsis", "treatment", "hospital"]
    assert [t["tokens_saved"] for t in record["tokens"]] == [15, 8, 4]
    for token in record["tokens"]:
        base_ids = bert_tokenizer(token["token"], add_special_tokens=False)["input_ids"]
        assert token["piece_ids"] == base_ids
        assert token["id"] >= len(bert_tokenizer)
    assert "sepsis" in out and "s ##e ##p ##s ##i ##s" in out  # what was added, and from what
    tokenizer = AutoTokenizer.from_pretrained(extended)
    assert len(tokenizer) == len(bert_tokenizer) + 3
    assert tokenizer.tokenize("Sepsis and treatment .") == ["sepsis", "and", "treatment", "."]
    result = last_json(out)
    assert result["tokens_per_word"] < result["reference_tokens_per_word"]


def test_added_words_match_whole_words_only(extended):
    tokenizer = AutoTokenizer.from_pretrained(extended)
    assert "sepsis" not in tokenizer.tokenize("antisepsis")


def test_new_embedding_rows_are_the_means_of_their_pieces(extended, tiny_bert):
    base = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    record = json.loads((extended / vocabulary.EXTENSION_FILE).read_text())["tokens"]
    cfg = ModelConfig(name_or_path=str(tiny_bert), tokenizer=str(extended))
    model = load_model(cfg, TASKS["mlm"], load_tokenizer(cfg, TASKS["mlm"]))
    old = base.get_input_embeddings().weight
    new = model.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 3
    assert torch.equal(new[: old.shape[0]], old)
    old_bias, new_bias = base.cls.predictions.bias, model.cls.predictions.bias
    for token in record:
        assert torch.allclose(new[token["id"]], old[token["piece_ids"]].mean(0))
        assert torch.allclose(new_bias[token["id"]], old_bias[token["piece_ids"]].mean())
    assert model.get_output_embeddings().weight is new  # tied: one matrix


def test_untied_output_rows_are_means_too(extended, tiny_bert):
    cfg = ModelConfig(
        name_or_path=str(tiny_bert),
        tokenizer=str(extended),
        config_overrides={"tie_word_embeddings": False},
    )
    model = load_model(cfg, TASKS["mlm"], load_tokenizer(cfg, TASKS["mlm"]))
    output = model.get_output_embeddings().weight
    assert output is not model.get_input_embeddings().weight
    for token in json.loads((extended / vocabulary.EXTENSION_FILE).read_text())["tokens"]:
        # the pieces' rows are the old ones (resizing keeps them): their mean is the new row
        assert torch.allclose(output[token["id"]], output[token["piece_ids"]].mean(0))
        assert not torch.allclose(output[token["id"]], output[token["piece_ids"][0]])


def test_run_with_extended_tokenizer_saves_it_in_final(
    extended, tmp_path, tiny_models_by_task, data_dir, capsys
):
    config = make_run_config(
        tmp_path,
        "mlm",
        tiny_models_by_task,
        data_dir,
        model={"tokenizer": str(extended)},
        data={"validation": None},
        train={"max_steps": 2},
    )
    assert cli("train", config) == 0
    final = tmp_path / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForMaskedLM.from_pretrained(final)
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert "sepsis" in tokenizer.get_vocab()
    assert len(read_metrics(tmp_path / "run")) == 2
    # evaluate reads the tokenizer saved in final/, not the one of the run config
    (extended / "tokenizer.json").unlink()
    capsys.readouterr()
    assert cli("evaluate", final, "--data", data_dir / "text_validation.txt") == 0
    assert "perplexity" in last_json(capsys.readouterr().out)


def test_missing_model_tokenizer_folder_is_one_line(tmp_path, run_config, capsys):
    config = run_config("mlm", model={"tokenizer": str(tmp_path / "nope")})
    assert cli("train", config) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.tokenizer: folder not found") and err.count("\n") == 1


def test_from_scratch_model_takes_its_size_from_the_tokenizer(tmp_path, tiny_bert, domain_texts):
    trained = train_tokenizer(domain_texts, "wordpiece", 300)
    trained.save_pretrained(tmp_path / "tok")
    cfg = ModelConfig(name_or_path=str(tiny_bert), tokenizer=str(tmp_path / "tok"))
    cfg.from_scratch = True
    model = load_model(cfg, TASKS["mlm"], load_tokenizer(cfg, TASKS["mlm"]))
    assert model.get_input_embeddings().num_embeddings == 300
    assert model.config.pad_token_id == trained.pad_token_id
