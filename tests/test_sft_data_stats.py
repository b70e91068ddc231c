"""`trainer data-stats` on sft data: the rows over data.max_length by what each
data.truncation policy makes of them, pinned on a file built to hold each case; and
training agrees: a row whose answer alone is too long is dropped and counted under either
policy, never trained on silently."""

from __future__ import annotations

import json

import pytest
from conftest import reset_accelerate
from test_sft import sft_config, train, write_jsonl
from tiny_models import WORDS
from transformers import AutoTokenizer

from trainer.cli import main
from trainer.data.chat_encode import (
    ANSWER_TOO_LONG,
    FITS,
    PROMPT_CUT,
    Tokens,
    overflow,
    row_tokens,
)

MAX_LENGTH = 32
SHORT, LONG = " ".join(WORDS[:2]), " ".join(WORDS[:40])


def chat(*contents: str) -> dict:
    """A conversation of alternating user and assistant turns."""
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]}


CASES = {
    FITS: [chat(SHORT, SHORT), chat(WORDS[3], WORDS[4]), chat(SHORT, WORDS[5]),
           chat(WORDS[6], SHORT), chat(WORDS[7], WORDS[8])],
    PROMPT_CUT: [chat(LONG, SHORT), chat(LONG, WORDS[2]), chat(LONG + " " + SHORT, SHORT),
                 chat(SHORT, LONG, SHORT, SHORT)],  # the long answer is an earlier turn
    ANSWER_TOO_LONG: [chat(SHORT, LONG), chat(LONG, LONG)],
}  # fmt: skip
ROWS = [row for rows in CASES.values() for row in rows]


def test_overflow_at_its_boundaries():
    """The last answer (positions 6-9) is kept whole with a prompt token before it, or not."""
    tokens = Tokens(list(range(10)), [False, True, False, False, False, False, *[True] * 4])
    assert overflow(tokens, 10) == FITS
    assert overflow(tokens, 5) == PROMPT_CUT  # keeps 5-9: one prompt token, then the answer
    assert overflow(tokens, 4) == ANSWER_TOO_LONG  # 6-9 alone: nothing predicts token 6


def test_the_file_holds_each_case(tiny_llama_chat):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    for expected, rows in CASES.items():
        for row in rows:
            assert overflow(row_tokens(tokenizer, row), MAX_LENGTH) == expected, row


@pytest.fixture
def sft_rows(tmp_path, tiny_llama_chat):
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    validation = write_jsonl(tmp_path / "validation.jsonl", [*CASES[FITS], *CASES[PROMPT_CUT]])

    def config(**settings) -> list[str]:
        settings = {"data.max_length": MAX_LENGTH, "data.validation": str(validation)} | settings
        return sft_config(tmp_path, tiny_llama_chat, train_file, **settings)

    return config


def test_data_stats_counts_what_each_policy_does(sft_rows, tmp_path, capsys):
    out_file = tmp_path / "stats.json"
    reset_accelerate()
    assert main(["data-stats", *sft_rows(), "--json", str(out_file)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out_file.read_text())
    train, validation = report["splits"]["train"], report["splits"]["validation"]
    assert train["rows"] == 11 and train["truncated_rows"] == 6
    assert train["truncation"] == {
        "rows_over_max_length": 6,
        "answer_too_long": 2,
        "keep_end": {"prompt_cut": 4, "dropped": 2},
        "drop": {"dropped": 6},
        "policy": "keep_end",
    }
    assert validation["truncation"]["keep_end"] == {"prompt_cut": 4, "dropped": 0}
    assert "labels" not in train and "conflicting_labels" not in train
    assert report["overlap"]["texts"] == 9  # whole conversations shared with train
    assert train["duplicate_rows"] == 0
    for line in ("keep_end: prompt cut", "keep_end: dropped", "drop: dropped"):
        assert line in table


@pytest.mark.parametrize(("policy", "dropped"), [("keep_end", 2), ("drop", 6)])
def test_training_drops_and_counts_what_data_stats_said(
    sft_rows, tmp_path, caplog, policy, dropped
):
    settings = {"data.truncation": policy, "train.max_steps": 1, "train.global_batch_size": 4}
    assert train(sft_rows(**settings, **{"train.micro_batch_size": 4})) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["train_examples"] == 11 - dropped
    assert summary["dropped_rows"]["train-0"] == dropped
    assert f"train-0: {dropped} rows over data.max_length=32 dropped" in caplog.text


def test_packed_examples_are_not_counted_as_dropped(sft_rows, tmp_path):
    settings = {"data.packing": "true", "data.max_length": 64, "train.max_steps": 1}
    settings |= {"data.train": str(write_jsonl(tmp_path / "fit.jsonl", CASES[FITS] * 4))}
    assert train(sft_rows(**settings)) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["train_examples"] < 20  # several examples a row, none of them dropped
    assert "dropped_rows" not in summary
