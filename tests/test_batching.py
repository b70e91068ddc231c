"""How examples become batches in real runs: length grouping cuts the logged padding,
weighted sources set the epoch, packed documents can be kept from attending to each other."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import read_metrics, write_csv
from interrupted_runs import cli
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from trainer.config import MlmConfig
from trainer.data.collate import CausalLMCollator, MaskedLMCollator, packs_by_position
from trainer.run.forward import model_inputs, without_cache


def mean_pad_fraction(run_dir) -> float:
    records = [r for r in read_metrics(run_dir) if "pad_fraction" in r]
    return sum(r["pad_fraction"] for r in records) / len(records)


def test_group_by_length_logs_less_padding(run_config, tmp_path):
    plain = run_config("classification", output_dir=str(tmp_path / "plain"))
    assert cli("train", plain) == 0
    grouped = run_config(
        "classification", output_dir=str(tmp_path / "grouped"), data={"group_by_length": True}
    )
    assert cli("train", grouped) == 0
    padded, sorted_ = mean_pad_fraction(tmp_path / "plain"), mean_pad_fraction(tmp_path / "grouped")
    assert padded > 0.15 and sorted_ < 0.5 * padded  # texts of 4-11 words, batches of 4
    summary = json.loads((tmp_path / "grouped" / "run_summary.json").read_text())
    assert summary["steps_per_epoch"] == 192 // 8  # every row once per epoch


def test_packed_blocks_log_no_padding(run_config, tmp_path):
    assert cli("train", run_config("clm", train={"max_steps": 2})) == 0
    assert mean_pad_fraction(tmp_path / "run") == 0.0


def test_two_weighted_sources_make_the_epoch(run_config, tmp_path, data_dir):
    extra = write_csv(
        tmp_path / "more.csv",
        [{"text": f"plain filler {i} .", "label": "positive"} for i in range(64)],
    )
    sources = [{"path": str(data_dir / "sentiment_train.csv"), "weight": 4}, str(extra)]
    assert cli("train", run_config("classification", data={"train": sources})) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert [s["examples"] for s in summary["train_sources"]] == [192, 64]
    assert [s["weight"] for s in summary["train_sources"]] == [0.8, 0.2]
    assert summary["steps_per_epoch"] == (192 + 64) // 8


# --- documents isolated inside packed blocks -------------------------------------------------


NEEDS_FLASH_ATTN = pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn (pip flash-attn)"
)
SETTINGS = [  # attention kernel, device, bf16 autocast
    ("sdpa", "cpu", False),
    ("eager", "cpu", False),
    pytest.param("sdpa", "cuda", True, marks=pytest.mark.gpu),
    pytest.param("eager", "cuda", True, marks=pytest.mark.gpu),
    # one row, position ids only: flash attention's variable-length path (packs_by_position)
    pytest.param("flash_attention_2", "cuda", True, marks=[pytest.mark.gpu, NEEDS_FLASH_ATTN]),
]


@pytest.mark.parametrize(("attention", "device", "bf16"), SETTINGS)
@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_an_isolated_document_is_computed_as_if_it_were_alone(
    task, attention, device, bf16, tiny_bert, tiny_gpt2, bert_tokenizer, gpt2_tokenizer
):
    tokenizer = bert_tokenizer if task == "mlm" else gpt2_tokenizer
    folder, auto = (
        (tiny_bert, AutoModelForMaskedLM) if task == "mlm" else (tiny_gpt2, AutoModelForCausalLM)
    )
    model = auto.from_pretrained(folder, attn_implementation=attention).to(device).eval()
    by_position = packs_by_position(attention)
    first, second = "the film was great and long", "a boring day in Paris"
    if task == "mlm":
        docs = [tokenizer(text)["input_ids"] for text in (first, second)]
        settings = MlmConfig(mask_probability=1e-9)
        collate = MaskedLMCollator(tokenizer, settings, isolate=True, by_position=by_position)
        example = {
            "input_ids": docs[0] + docs[1],
            "special_tokens_mask": [0] * (len(docs[0]) + len(docs[1])),
            "word_start": [1] * (len(docs[0]) + len(docs[1])),
            "seed": 0,
        }
    else:
        eos = tokenizer.eos_token_id
        docs = [tokenizer(text)["input_ids"] + [eos] for text in (first, second)]
        collate = CausalLMCollator(eos, by_position=by_position)
        example = {"input_ids": docs[0] + docs[1]}
    batch = {key: value.to(device) for key, value in collate([example]).items()}
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        inputs = model_inputs(batch) | without_cache(model)  # as training calls it
        packed = model(**inputs).logits[0, len(docs[0]) :].float()
        alone = model(input_ids=torch.tensor([docs[1]], device=device)).logits[0].float()
        leaky = model(input_ids=batch["input_ids"]).logits[0, len(docs[0]) :].float()
    assert torch.allclose(packed, alone, atol=1e-5 if not bf16 else 2e-2)
    assert not torch.allclose(leaky, alone, atol=1e-3 if not bf16 else 5e-2)  # leaks


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_a_run_with_isolated_documents_trains(run_config, tmp_path, task):
    config = run_config(task, data={"isolate_documents": True}, train={"max_steps": 4})
    assert cli("train", config) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r and "step" in r]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0]
