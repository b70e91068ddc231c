"""trainer.data.stream: disjoint shards that cover every row once per pass, weighted mixing,
and a position that resumes a stream exactly; then a streamed run stopped and resumed."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_run_config
from interrupted_runs import (
    assert_same_tensors,
    cli,
    comparable,
    final_weights,
    stop_in_process,
    subprocess_env,
    trainer_command,
)

from trainer.config import DataConfig
from trainer.data.encode import Packer
from trainer.data.stream import RowStream, ShardStream, SourceBlocks, TrainStream
from trainer.errors import UserError
from trainer.run.resume import checkpoint_dir


def numbered_files(folder: Path, first: int = 0) -> Path:
    """Rows `first` .. `first`+89 as text in three formats (30 rows each), blank lines and
    a parquet file with two row groups included: the glob `folder/part-*` names them all."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [str(n) for n in range(first, first + 90)]
    (folder / "part-0.txt").write_text("\n\n".join(numbers[:30]) + "\n")
    rows = "".join(json.dumps({"text": n, "other": 1}) + "\n" for n in numbers[30:60])
    (folder / "part-1.jsonl").write_text(rows)
    table = pa.table({"text": numbers[60:]})
    pq.write_table(table, folder / "part-2.parquet", row_group_size=12)
    return folder / "part-*"


def rows(source: Path, rank: int = 0, world: int = 1, seed: int = 0) -> RowStream:
    return RowStream(str(source), "data.train", DataConfig(), rank, world, seed)


def one_pass(stream: RowStream) -> list[int]:
    texts = stream.texts()
    found = []
    while stream.position["pass"] == 0:
        found.append(int(next(texts)))
    return found[:-1]  # the last one read belongs to the next pass


def test_ranks_read_disjoint_shares_that_cover_every_row_once_per_pass(tmp_path):
    source = numbered_files(tmp_path)
    alone = one_pass(rows(source))
    assert sorted(alone) == list(range(90))
    shares = [one_pass(rows(source, rank, 2)) for rank in (0, 1)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(90))
    assert len(shares[0]) == len(shares[1]) == 45


def test_each_pass_reads_the_files_in_a_new_seeded_order(tmp_path):
    stream = rows(numbered_files(tmp_path), seed=3)
    orders = [[path.suffix for path in stream.file_order(n)] for n in range(6)]
    assert len({tuple(order) for order in orders}) > 1
    assert orders == [
        [p.suffix for p in rows(stream.source, seed=3).file_order(n)] for n in range(6)
    ]


@pytest.mark.parametrize("stop", [5, 31, 47, 70, 95])  # in each file, and in the second pass
def test_a_stream_resumed_from_its_position_continues_exactly(tmp_path, stop):
    source = numbered_files(tmp_path)
    reference = list(islice(rows(source, 1, 2).texts(), 120))
    first = rows(source, 1, 2)
    head = list(islice(first.texts(), stop))
    resumed = rows(source, 1, 2)
    resumed.position = json.loads(json.dumps(first.position))  # as a checkpoint keeps it
    assert head + list(islice(resumed.texts(), 120 - stop)) == reference


def digits(texts: list[str]) -> dict[str, list[list[int]]]:
    """A stand-in tokenizer: each text becomes its number followed by a separator 0."""
    return {"input_ids": [[int(text), 0] for text in texts]}


def train_stream(sources: list[Path], weights: list[float], shard: int = 0, shards: int = 1):
    blocks = [SourceBlocks(rows(s, shard, shards), digits, Packer(4)) for s in sources]
    return ShardStream(blocks, weights, buffer_size=16, seed=7, shard=shard)


def test_a_train_stream_resumed_from_its_state_gives_the_same_blocks(tmp_path):
    sources = [numbered_files(tmp_path / "a"), numbered_files(tmp_path / "b", first=1000)]
    reference = list(islice(train_stream(sources, [0.5, 0.5]).examples(), 200))
    first = train_stream(sources, [0.5, 0.5])
    head = list(islice(first.examples(), 77))
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as in a checkpoint
    resumed = train_stream(sources, [0.5, 0.5])
    resumed.load_state_dict(state)
    assert head + list(islice(resumed.examples(), 123)) == reference
    assert len({example["seed"] for example in reference}) == 200  # masking differs per block


def processes(sources: list[Path], world: int) -> list[TrainStream]:
    """The streams of `world` processes, global batches of 8 blocks."""

    def shard(index: int, count: int) -> ShardStream:
        return train_stream(sources, [0.5, 0.5], index, count)

    return [TrainStream(shard, 8, world, rank) for rank in range(world)]


def global_batches(streams: list[TrainStream], steps: int) -> list[list[dict]]:
    """The blocks of each global batch: every process's micro-batches (of 2), rank after rank."""
    micro_batches = [stream.micro_batches(2, list) for stream in streams]
    per_process = 8 // len(streams) // 2
    return [
        [block for batches in micro_batches for _ in range(per_process) for block in next(batches)]
        for _ in range(steps)
    ]


def test_on_as_many_processes_process_i_reads_shard_i_alone(tmp_path):
    sources = [numbered_files(tmp_path / "a"), numbered_files(tmp_path / "b", first=1000)]
    streams = processes(sources, 2)
    assert [list(stream.shards) for stream in streams] == [[0], [1]]
    batch = global_batches(streams, 1)[0]
    alone = list(islice(train_stream(sources, [0.5, 0.5], 1, 2).examples(), 4))
    assert batch[4:] == alone


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_a_stream_resumed_on_another_process_count_trains_the_same_global_batches(
    tmp_path, saved_on, resumed_on
):
    sources = [numbered_files(tmp_path / "a"), numbered_files(tmp_path / "b", first=1000)]
    reference = global_batches(processes(sources, saved_on), 12)
    first = processes(sources, saved_on)
    head = global_batches(first, 5)
    saved = json.dumps([stream.state_dict() for stream in first])
    resumed = processes(sources, resumed_on)
    for stream in resumed:  # each process reads the saved files for itself
        stream.load_state_dict(json.loads(saved))
    assert head + global_batches(resumed, 7) == reference
    assert len({block["seed"] for batch in reference for block in batch}) == 12 * 8


def test_mixing_weights_hold(tmp_path):
    sources = [numbered_files(tmp_path / "a"), numbered_files(tmp_path / "b", first=1000)]
    blocks = islice(train_stream(sources, [0.7, 0.3]).examples(), 3000)
    # a block holds two numbers of one source: below 1000 is source a
    counts = Counter(block["input_ids"][0] < 1000 for block in blocks)
    assert counts[True] / 3000 == pytest.approx(0.7, abs=0.025)


def test_the_shuffle_buffer_mixes_the_order(tmp_path):
    source = numbered_files(tmp_path)
    numbers = [b["input_ids"][0] for b in islice(train_stream([source], [1.0]).examples(), 29)]
    assert numbers != sorted(numbers)
    assert len(set(numbers)) == 29  # 29 + 16 buffered: all from the first pass


def test_streamed_rows_are_checked_where_they_are_read(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": ""}\n')
    with pytest.raises(UserError, match=r"bad.jsonl at byte 17: no text in column 'text'"):
        list(islice(rows(tmp_path / "bad.jsonl").texts(), 2))
    (tmp_path / "notes.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"streaming reads \.txt, \.jsonl, \.parquet"):
        rows(tmp_path / "notes.csv")
    with pytest.raises(UserError, match=r"data\.train: no file matches"):
        rows(tmp_path / "missing-*.txt")


# --- a streamed run ------------------------------------------------------------------------


def streamed_config(folder: Path, tiny_models_by_task, data_dir: Path) -> Path:
    """MLM (dropout on) streamed from two weighted sources, with gradient accumulation, a
    shuffle buffer, and checkpoints every 2 steps; validation from its own file."""
    folder.mkdir()
    sources = [
        {"path": str(data_dir / "text.txt"), "weight": 3},
        {"path": str(data_dir / "text_validation.txt"), "weight": 1},
    ]
    return make_run_config(
        folder,
        "mlm",
        tiny_models_by_task,
        data_dir,
        data={"train": sources, "streaming": True, "shuffle_buffer": 8},
        train={"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 2},
        checkpoint={"every_steps": 2},
    )


def test_a_streamed_run_stopped_and_resumed_equals_the_uninterrupted_one(
    tmp_path, tiny_models_by_task, data_dir
):
    reference = streamed_config(tmp_path / "ref", tiny_models_by_task, data_dir)
    assert cli("train", reference) == 0
    summary = json.loads((tmp_path / "ref" / "run" / "run_summary.json").read_text())
    assert summary["train_examples"] is None
    assert [s["weight"] for s in summary["train_sources"]] == [0.75, 0.25]

    cut = streamed_config(tmp_path / "cut", tiny_models_by_task, data_dir)
    assert stop_in_process(cut, 3) == 75
    assert cli("train", cut) == 0
    assert comparable(tmp_path / "cut" / "run") == comparable(tmp_path / "ref" / "run")
    assert_same_tensors(
        final_weights(tmp_path / "cut" / "run"), final_weights(tmp_path / "ref" / "run")
    )
    losses = [r["loss"] for r in comparable(tmp_path / "ref" / "run") if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.slow
def test_two_processes_stream_disjoint_shares(tmp_path, tiny_models_by_task, data_dir):
    """Under torchrun each rank streams its own rows: the blocks the two ranks hold in
    their shuffle buffers at a checkpoint have nothing in common."""
    config = streamed_config(tmp_path / "two", tiny_models_by_task, data_dir)
    done = subprocess.run(
        trainer_command(config, processes=2), cwd=REPO, env=subprocess_env(), capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    checkpoint = checkpoint_dir(tmp_path / "two" / "run", 6)
    buffers = [
        json.loads((checkpoint / f"trainer_rank_{rank}.json").read_text())["stream"]["states"][
            str(rank)
        ]["buffer"]
        for rank in (0, 1)
    ]
    blocks = [{tuple(block["input_ids"]) for block in buffer} for buffer in buffers]
    assert len(blocks[0]) == len(blocks[1]) == 7  # 8, less the one just drawn
    assert not blocks[0] & blocks[1]
