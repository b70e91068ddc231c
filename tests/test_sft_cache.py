"""The tokenization cache for sft: every setting that changes which tokens a row becomes,
or which of them train, keys the cache; the same run again reads what it built."""

from __future__ import annotations

import json

import pytest
from test_sft import reverse_rows, sft_config, train, write_jsonl

from trainer.config import load_config
from trainer.data.prepare import data_key

CHANGES = [
    "data.packing=true",
    "data.train_on_prompt=true",
    "data.last_turn_only=true",
    "data.truncation=drop",
    "data.messages_column=turns",
    "data.prompt_column=question",
    "data.completion_column=answer",
    "data.max_length=64",
]


@pytest.fixture
def argv(tmp_path, tiny_llama_chat):
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(32, 3, "messages"))
    return sft_config(tmp_path, tiny_llama_chat, train_file, **{"train.max_steps": 1})


@pytest.mark.parametrize("change", CHANGES)
def test_each_encoding_setting_keys_the_cache(argv, change):
    base = data_key(load_config(argv[0], argv[1:]))
    assert data_key(load_config(argv[0], [*argv[1:], change])) != base
    assert data_key(load_config(argv[0], [*argv[1:], "train.lr=0.5"])) == base


def run_data(tmp_path, argv: list[str], *overrides: str) -> tuple[str, int]:
    """(cache status, training examples) of a one-step run in its own output folder."""
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    assert train([*argv, f"output_dir={out}", *overrides]) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    return summary["data_cache"]["status"], summary["train_examples"]


def test_packing_after_an_unpacked_run_builds_its_own_entry(tmp_path, argv):
    """Before data.packing keyed the cache, the packed run read the unpacked rows."""
    assert run_data(tmp_path, argv, "data.max_length=128") == ("built", 32)
    status, packed_rows = run_data(tmp_path, argv, "data.max_length=128", "data.packing=true")
    assert status == "built" and packed_rows < 16
    assert run_data(tmp_path, argv, "data.max_length=128", "data.packing=true") == (
        "hit",
        packed_rows,
    )
