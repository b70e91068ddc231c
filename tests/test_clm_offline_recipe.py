"""The offline way into causal LMs, exactly as the recipes ship: `trainer tokenizer train`
on the from-scratch recipe, the tiny GPT-2 trained from random weights, and its final/ as
the base of both continued-pretraining recipes (full and LoRA). Run from a folder that holds
the repository's configs/ and data/, so every relative path in the recipes is the one a
user gets; budgets are cut so that the test takes seconds."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, read_metrics, reset_accelerate
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.cli import main

SHORT = ("train.epochs=3", "log.every_steps=1", "log.trackers=[]")


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_tokenizer_then_tiny_gpt2_then_both_continued_pretraining_recipes(
    tmp_path, monkeypatch, capsys
):
    for shipped in ("configs", "data"):
        (tmp_path / shipped).symlink_to(REPO / shipped)
    monkeypatch.chdir(tmp_path)
    recipe = "configs/clm-tiny-gpt2-from-scratch.yaml"
    # the recipe's own first-comment command: the tokenizer's corpus is the recipe's data
    assert cli("tokenizer", "train", recipe, "--type", "bpe", "--vocab-size", 2000,
               "--out", "runs/general-bpe") == 0  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "runs/general-bpe")
    assert tokenizer.eos_token == "<|endoftext|>"  # CLM packing joins documents with it
    capsys.readouterr()

    assert cli("train", recipe, *SHORT) == 0
    base = tmp_path / "runs/clm-tiny-gpt2/final"
    model = AutoModelForCausalLM.from_pretrained(base)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.n_layer == 4 and model.config.n_embd == 128
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    losses = [r["loss"] for r in read_metrics(base.parent) if "loss" in r and "lr" in r]
    assert losses[-1] < losses[0] - 0.5  # from ln(2000) = 7.6, in six steps

    for continued in ("clm-continued-pretraining", "clm-lora-continued-pretraining"):
        out_dir = tmp_path / "runs" / continued
        capsys.readouterr()
        assert cli("train", f"configs/{continued}.yaml", f"model.name_or_path={base}",
                   f"output_dir={out_dir}", "eval.every_steps=0", *SHORT) == 0  # fmt: skip
        results = last_json(capsys.readouterr().out)
        assert results["metric"] == "perplexity" and results["perplexity"] > 1
        assert (out_dir / "final").is_dir()
