"""Streamed sft (`data.streaming` with task sft, trainer/data/chat_stream.py): each streamed
example is the in-memory encoding of its row, packed with the same isolation, each once a
pass; a stream and a streamed run stopped mid-stream resume exactly; a bad row met mid-run
is one error line naming the file and row; the config accepts streaming for sft and keeps
its limits."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_metrics
from interrupted_runs import assert_same_tensors, cli, comparable, final_weights, stop_in_process
from test_config import error_of, minimal
from test_sft import reverse_rows, sft_config, write_jsonl
from tiny_models import WORDS
from transformers import AutoTokenizer

import trainer.data.stream
from trainer.config import DataConfig, build_config
from trainer.data.chat_encode import IGNORE_INDEX, encode_chat
from trainer.data.chat_rows import CHAT
from trainer.data.chat_stream import example_blocks
from trainer.data.read import read_split
from trainer.data.stream import READ_BATCH, ShardSource, SourceBlocks
from trainer.errors import UserError
from trainer.run.resume import checkpoint_dir
from trainer.run.stop import EXIT_PREEMPTED

LONG = " ".join(WORDS[:40])  # a prompt over max_length 48: keep_end cuts it, drop drops it
ALL_SHAPES = ("messages", "alpaca", "pairs")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_chat):
    return AutoTokenizer.from_pretrained(tiny_llama_chat)


def sft_rows(count: int, shapes: tuple[str, ...] = ALL_SHAPES) -> list[dict]:
    """Rows of the given formats in turn (prompt/completion renamed to question/answer),
    every ninth one with a prompt too long for max_length 48."""
    rows = []
    for i in range(count):
        shape = shapes[i % len(shapes)]
        row = reverse_rows(1, i, shape)[0]
        if i % 9 == 4:
            row = {
                "messages": {"messages": [{"role": "user", "content": LONG},
                                          {"role": "assistant", "content": "good"}]},
                "alpaca": {"instruction": LONG, "input": "", "output": "good"},
                "pairs": {"prompt": LONG, "completion": " good"},
            }[shape]  # fmt: skip
        if shape == "pairs":
            row = {"question": row["prompt"], "answer": row["completion"]}
        rows.append(row)
    return rows


def settings(**changes) -> DataConfig:
    base = {"max_length": 48, "prompt_column": "question", "completion_column": "answer"}
    return DataConfig(**(base | changes))


def blocks(source, tokenizer, data: DataConfig, shard: int = 0, shards: int = 1) -> SourceBlocks:
    return example_blocks(tokenizer, data, ShardSource(str(source), "data.train", shard, shards, 0))


def in_memory(source: Path, tokenizer, data: DataConfig) -> datasets.Dataset:
    return encode_chat(read_split(str(source), "data.train", CHAT, data), tokenizer, data)


def examples_of(rows) -> Counter:
    """(ids, labels) of each example packed in `rows`, cut by their example lengths."""
    found = Counter()
    for ids, labels, lengths in zip(
        rows["input_ids"], rows["labels"], rows["example_lengths"], strict=True
    ):
        start = 0
        for length in lengths:
            found[tuple(ids[start : start + length]), tuple(labels[start : start + length])] += 1
            start += length
    return found


def columns(blocks: list[dict]) -> dict[str, list]:
    return {key: [block[key] for block in blocks] for key in blocks[0] if key != "seed"}


def first_pass(stream: SourceBlocks, rows: int) -> list[dict]:
    """The blocks handed out for the first `rows` rows (a multiple of READ_BATCH: the
    stream reads them in whole batches), before any row of the next pass is read."""
    handed, made = [], stream.blocks()
    while stream.rows.position["row"] < rows or stream.pending:
        handed.append(next(made))
    assert stream.rows.position["pass"] == 0
    return handed


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_packed_streamed_examples_are_the_in_memory_ones_each_once_a_pass(
    tmp_path, tokenizer, suffix
):
    count = 3 * READ_BATCH
    if suffix == ".jsonl":
        source = write_jsonl(tmp_path / "train.jsonl", sft_rows(count))
    else:  # one format a file (a table's rows share their columns)
        source = tmp_path / "train.parquet"
        table = pa.Table.from_pylist(sft_rows(count, ("messages",)))
        pq.write_table(table, source, row_group_size=50)
    data = settings(packing=True)
    packed = in_memory(source, tokenizer, data)
    expected = examples_of(packed.to_dict())
    assert sum(expected.values()) == count  # keep_end cut the long prompts, none dropped
    assert any(len(ids) == 48 for ids, _ in expected)

    stream = blocks(source, tokenizer, data)
    handed = first_pass(stream, count)
    assert all(len(b["input_ids"]) == sum(b["example_lengths"]) <= 48 for b in handed)
    held = stream.packer.carry  # the open rows' examples, as they would be packed
    assert held["input_ids"], "a partly filled row waits for the next examples"
    waiting = Counter(
        (tuple(ids), (IGNORE_INDEX, *labels[1:]))
        for ids, labels in zip(held["input_ids"], held["labels"], strict=True)
    )
    assert examples_of(columns(handed)) + waiting == expected
    # packed on the fly about as densely as the whole split at once
    assert len(handed) <= len(packed) + 4


def test_unpacked_streamed_examples_are_the_in_memory_rows_in_order(tmp_path, tokenizer):
    rows = sft_rows(90)
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    data = settings(truncation="drop")
    expected = in_memory(source, tokenizer, data)
    assert 70 < len(expected) <= 80  # every ninth row dropped for its length, and a few more
    streamed = list(islice(blocks(source, tokenizer, data).blocks(), len(expected)))
    assert [b["input_ids"] for b in streamed] == expected["input_ids"]
    assert [b["labels"] for b in streamed] == expected["labels"]
    for shard in (0, 1):  # shard i of 2: rows i, i + 2, ...
        alone = write_jsonl(tmp_path / f"shard-{shard}.jsonl", rows[shard::2])
        own = in_memory(alone, tokenizer, data)
        streamed = list(islice(blocks(source, tokenizer, data, shard, 2).blocks(), len(own)))
        assert [b["labels"] for b in streamed] == own["labels"]


def test_hub_rows_stream_as_files_do(tmp_path, tokenizer, monkeypatch):
    rows = sft_rows(30, ("messages",))
    hub = datasets.Dataset.from_list(rows).to_iterable_dataset()
    monkeypatch.setattr(trainer.data.stream, "load_hub", lambda *args, **kwargs: hub)
    data = settings()
    expected = in_memory(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer, data)
    streamed = list(islice(blocks("someone/sft-rows", tokenizer, data).blocks(), 30))
    assert [b["labels"] for b in streamed] == expected["labels"]


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("stop", [3, 40, 95])  # in the first batch, later, in the next pass
def test_a_stream_resumed_from_its_state_continues_exactly(tmp_path, tokenizer, packing, stop):
    source = write_jsonl(tmp_path / "train.jsonl", sft_rows(100))
    data = settings(packing=packing)
    reference = list(islice(blocks(source, tokenizer, data).blocks(), 150))
    first = blocks(source, tokenizer, data)
    head = list(islice(first.blocks(), stop))
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as in a checkpoint
    assert bool(state.get("carry", {}).get("input_ids")) == packing  # the open rows travel
    resumed = blocks(source, tokenizer, data)
    resumed.load_state_dict(state)
    assert head + list(islice(resumed.blocks(), 150 - stop)) == reference


# --- bad rows --------------------------------------------------------------------------------


def first_error(source: Path, tokenizer, data: DataConfig, reads: int = 200) -> str:
    with pytest.raises(UserError) as caught:
        list(islice(blocks(source, tokenizer, data).blocks(), reads))
    return str(caught.value)


def test_a_bad_streamed_row_names_the_file_and_row(tmp_path, tokenizer):
    good = [json.dumps(row) for row in sft_rows(80, ("messages",))]
    lines = [*good[:70], "", '{"messages": [{"role": "robot", "content": "hi"}]}', *good[70:]]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert first_error(path, tokenizer, settings()) == (
        "data.train: train.jsonl line 72: 'messages' message 1 has the unknown role 'robot' "
        "(roles: system, user, assistant)"
    )
    path.write_text("\n".join([*good[:5], "{not json", *good[5:]]) + "\n")
    assert first_error(path, tokenizer, settings()).startswith(
        "data.train: train.jsonl line 6: not valid JSON ("
    )
    path.write_text("\n".join([*good[:5], "[1, 2]"]) + "\n")
    assert first_error(path, tokenizer, settings()) == (
        "data.train: train.jsonl line 6: expected a JSON object"
    )
    rows = sft_rows(10, ("messages",))
    rows[6]["messages"][1]["content"] = " "
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet", row_group_size=4)
    assert first_error(tmp_path / "train.parquet", tokenizer, settings()) == (
        "data.train: train.parquet row 7: 'messages' has an empty assistant turn"
    )


def test_a_stream_that_drops_every_row_or_reads_text_is_refused(tmp_path, tokenizer):
    long = sft_rows(14)[4::9]  # the too-long rows only
    path = write_jsonl(tmp_path / "train.jsonl", long)
    assert first_error(path, tokenizer, settings(truncation="drop")) == (
        f"data.train: {path}: every row is longer than data.max_length=48, and "
        "data.truncation=drop drops them all (trainer data-stats counts them)"
    )
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(UserError, match=r"^data.train: notes.txt: streaming reads .jsonl, .parq"):
        blocks(tmp_path / "notes.txt", tokenizer, settings())


# --- streamed runs ---------------------------------------------------------------------------


def streamed_sft(folder: Path, model: Path, train: Path, packing: bool, **changes) -> list[str]:
    """sft streamed from one file with a validation file, gradient accumulation (micro 2 of
    8), a shuffle buffer, and checkpoints every 2 steps: 12 steps read the file about twice
    (packed: ~3 batches of 64 rows, whose open rows are carried from one to the next)."""
    settings = {
        "data.streaming": "true",
        "data.packing": str(packing).lower(),
        "data.max_length": 128,
        "data.shuffle_buffer": 8,
        "data.validation": str(train.with_name("validation.jsonl")),
        "train.max_steps": 12,
        "train.micro_batch_size": 2,
        "train.lr": 3e-3,
        "checkpoint.every_steps": 2,
        "eval.every_steps": 4,
        "eval.batch_size": 4,
    }
    return sft_config(folder, model, train, **(settings | changes))


@pytest.mark.parametrize("packing", [True, False])
def test_a_streamed_sft_run_stopped_and_resumed_equals_the_uninterrupted_one(
    tmp_path, tiny_llama_chat, packing
):
    train = write_jsonl(tmp_path / "train.jsonl", reverse_rows(60, 5, "messages"))
    write_jsonl(tmp_path / "validation.jsonl", reverse_rows(12, 6, "messages"))
    reference = streamed_sft(tmp_path / "ref", tiny_llama_chat, train, packing)
    assert cli("train", *reference) == 0
    ref_dir = tmp_path / "ref" / "run"
    summary = json.loads((ref_dir / "run_summary.json").read_text())
    assert summary["train_examples"] is None and summary["accumulation_steps"] == 4

    cut = streamed_sft(tmp_path / "cut", tiny_llama_chat, train, packing)
    assert stop_in_process(cut[0], 5, *cut[1:]) == EXIT_PREEMPTED
    cut_dir = tmp_path / "cut" / "run"
    saved = json.loads((checkpoint_dir(cut_dir, 5) / "trainer_rank_0.json").read_text())
    source = saved["stream"]["states"]["0"]["sources"][0]
    assert bool(source.get("carry", {}).get("input_ids")) == packing  # a partly filled row
    assert cli("train", *cut) == 0
    records = comparable(cut_dir)
    assert records == comparable(ref_dir)
    assert_same_tensors(final_weights(cut_dir), final_weights(ref_dir))
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert any("eval_loss" in r for r in records)


def test_a_bad_row_met_mid_run_is_one_error_line(tmp_path, tiny_llama_chat, capsys):
    rows = reverse_rows(100, 4, "messages")
    rows[69] = {"messages": [{"role": "user", "content": "hi"}]}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", reverse_rows(4, 6, "messages"))
    argv = streamed_sft(tmp_path, tiny_llama_chat, train, False, **{"train.max_steps": 20})
    assert cli("train", *argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == ["error: data.train: train.jsonl line 70: 'messages' has no assistant turn"
                      " to train on"]  # fmt: skip
    assert len([r for r in read_metrics(tmp_path / "run") if "loss" in r]) >= 5  # mid-run


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False])
def test_streaming_sft_is_accepted_with_its_limits(packing):
    stream = {"train": "train.jsonl", "streaming": True, "packing": packing}
    cfg = build_config(minimal(task="sft", data=stream, train={"max_steps": 10}), world_size=1)
    assert cfg.data.streaming and cfg.data.packing == packing
    message = error_of(minimal(task="sft", data=stream | {"validation_split": 0.1}))
    assert "data.streaming: a stream has no known length; set train.max_steps" in message
    assert "data.validation_split: not with streaming; name data.validation" in message
    assert "data.streaming: only for" not in message
    message = error_of(minimal(task="sft", data=stream | {"group_by_length": True}))
    assert "data.group_by_length: not with streaming" in message
    message = error_of(minimal(task="preference", data=stream, train={"max_steps": 10}))
    assert "data.streaming: only for mlm, clm, sft" in message
