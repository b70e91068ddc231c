"""Streaming a training corpus larger than memory: read, shard, tokenize, pack, mix and
shuffle on the fly, from a position that every checkpoint saves.

The rows are cut into shards, as many as the run had processes when it first started:
row r of a pass (counted over all files, in the pass's seeded file order) belongs to shard
r mod shards, so the shards are disjoint and together cover every row once per pass. A
shard tokenizes only its rows, packs them into blocks (carrying what does not fill one),
draws blocks from the sources by weight and sends them through a seeded shuffle buffer.
Every global batch takes the same number of consecutive blocks from each shard, shard after
shard, and each process trains its slice of that: on the first start, process i reads
shard i alone. The shard count is part of the saved state, so a run resumed on another
number of processes deals the same shards out again and trains the same global batches.

The state of all of it is small and JSON-able: per source the file, byte offset (row for
parquet) and row counter, the packer's carry and the blocks not yet used; then the buffer,
the random generator and the count of blocks handed out. Saved in a checkpoint after the
step's last micro-batch, it lets a resumed run continue with exactly the blocks the
uninterrupted run would have seen, without reading again what was consumed (local files
are reopened at the saved byte offset; hub datasets are skipped forward by `datasets`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from trainer.data.collate import example_seed
from trainer.data.encode import Columns, Packer
from trainer.data.read import load_hub, source_files
from trainer.data.sampling import hash_seed
from trainer.errors import UserError
from trainer.text_files import strip_bom

if TYPE_CHECKING:
    from trainer.config import DataConfig

READ_BATCH = 64  # documents tokenized per tokenizer call
STREAM_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _decode(line: bytes, path: Path, offset: int) -> str:
    if offset == 0:  # a UTF-8 byte-order mark is dropped, a UTF-16/32 one refused
        line = strip_bom(path.name, line)
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path.name} at byte {offset}: not UTF-8 text") from None


def text_lines(path: Path, offset: int, column: str) -> Iterator[tuple[str | None, int]]:
    """Non-blank lines from a byte offset, each with the offset after it."""
    with path.open("rb") as handle:
        handle.seek(offset)
        while line := handle.readline():
            if line.strip():
                yield _decode(line, path, offset).rstrip("\n"), handle.tell()
            offset = handle.tell()


def _json_lines(path: Path, offset: int, column: str) -> Iterator[tuple[str | None, int]]:
    """The text column of JSON lines; a line is parsed only when it is this rank's (the
    caller passes None-texts through untouched), so unowned rows cost no parsing."""
    for line, after in text_lines(path, offset, column):
        yield _JsonText(line, column, path, offset), after
        offset = after


@dataclass
class _JsonText:
    """A JSON line whose text is extracted only if the row is kept."""

    line: str
    column: str
    path: Path
    offset: int

    def text(self) -> str:
        try:
            row = json.loads(self.line)
        except json.JSONDecodeError as err:
            raise UserError(f"{self._where()}: not valid JSON ({err.msg})") from None
        value = row.get(self.column) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{self._where()}: no text in column '{self.column}'")
        return value

    def _where(self) -> str:
        return f"{self.path.name} at byte {self.offset}"


def parquet_rows(path: Path, offset: int, column: str | None) -> Iterator[tuple[object, int]]:
    """The text column of a parquet file (None: whole rows, as dicts) from row `offset`,
    one row group at a time."""
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(path)
    if column is not None and column not in reader.schema_arrow.names:
        raise UserError(f"{path.name}: no column '{column}'")
    first = 0
    for group in range(reader.num_row_groups):
        size = reader.metadata.row_group(group).num_rows
        if first + size > offset:
            if column is None:
                values = reader.read_row_group(group).to_pylist()
            else:
                values = reader.read_row_group(group, columns=[column]).column(0).to_pylist()
            for index in range(max(0, offset - first), size):
                yield values[index], first + index + 1
        first += size


READERS = {".txt": text_lines, ".jsonl": _json_lines, ".parquet": parquet_rows}


def _start() -> dict:
    """A stream's position before its first row (`kept`: the rows of this pass it kept)."""
    return {"pass": 0, "file": 0, "offset": 0, "row": 0, "kept": 0}


@dataclass
class RowStream:
    """One shard's texts from one source, pass after pass, from a saved position (`rank`
    is the shard, `world_size` the number of shards). What a row becomes is `_kept`'s (and
    `_hub_kept`'s) to say: here its text; sft's stream (data/chat_stream.py) encodes it."""

    source: str
    key: str
    data: DataConfig
    rank: int
    world_size: int
    seed: int
    position: dict = field(default_factory=_start)
    suffixes: ClassVar[tuple[str, ...]] = STREAM_SUFFIXES

    def __post_init__(self) -> None:
        self.files = source_files(self.source, self.key)
        for path in self.files or []:
            if path.suffix.lower() not in self.suffixes:
                raise UserError(
                    f"{self.key}: {path.name}: streaming reads {', '.join(self.suffixes)}"
                )

    def texts(self) -> Iterator:
        """Endless: a new pass starts (with a new file order) where the last one ended. A
        pass that leaves this shard nothing is an error (it would be read forever)."""
        while True:
            try:
                yield from self._hub_pass() if self.files is None else self._file_pass()
                if not self.position["kept"]:
                    raise UserError(self._nothing_kept())
            except UserError as err:  # read on the fly: name the source as read_split does
                raise UserError(f"{self.key}: {err}") from None
            self.position.update({**_start(), "pass": self.position["pass"] + 1})

    def file_order(self, number: int) -> list[Path]:
        """The files of pass `number`, in a seeded order (the same on every rank)."""
        order = list(self.files or [])
        random.Random(hash_seed(self.seed, number)).shuffle(order)
        return order

    def _file_pass(self) -> Iterator[str]:
        position = self.position
        order = self.file_order(position["pass"])
        while position["file"] < len(order):
            path = order[position["file"]]
            for raw, after in self._read(path, position["offset"]):
                mine = position["row"] % self.world_size == self.rank
                position["row"] += 1
                position["offset"] = after
                if mine and (item := self._kept(raw, path, after)) is not None:
                    position["kept"] += 1
                    yield item
            position.update({"file": position["file"] + 1, "offset": 0})

    def _hub_pass(self) -> Iterator:
        from datasets.distributed import split_dataset_by_node

        stream = load_hub(self.source, self.data, streaming=True)
        mine = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        for row in mine.skip(self.position["offset"]):
            self.position["offset"] += 1
            if (item := self._hub_kept(row, self.position["offset"])) is not None:
                self.position["kept"] += 1
                yield item

    def _read(self, path: Path, offset: int) -> Iterator[tuple[object, int]]:
        """A file's rows from `offset` (bytes, or rows of parquet), each with the offset
        after it."""
        return READERS[path.suffix.lower()](path, offset, self.data.text_column)

    def _kept(self, raw: object, path: Path, after: int) -> object | None:
        """What the stream yields for one of its file rows (None: nothing), read up to
        `after`: its text."""
        return _checked(raw.text() if isinstance(raw, _JsonText) else raw, path)

    def _hub_kept(self, row: dict, number: int) -> object | None:
        """What the stream yields for the `number`-th hub row of its shard: its text."""
        return _checked(row.get(self.data.text_column), Path(self.source))

    def _nothing_kept(self) -> str:
        """Why a whole pass left this shard no row."""
        return (
            f"{self.source}: a whole pass holds no row for shard {self.rank} of "
            f"{self.world_size} (fewer rows than the run's first processes)"
        )


def _checked(text, path: Path) -> str:
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{path.name}: a row without text in the streamed data")
    return text


class Blocks(Protocol):
    """What makes a source's blocks of its documents: `Packer` (MLM/CLM), or sft's packed
    or unpacked examples (data/chat_stream.py); its state is JSON-able."""

    def add(self, documents: Columns) -> Columns:
        """The blocks ready once `documents` join what it holds."""
        ...

    def state_dict(self) -> dict:
        """What it holds (keys other than `position` and `pending`)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`."""
        ...


@dataclass
class SourceBlocks:
    """One source's rows tokenized and packed into blocks, with its position."""

    rows: RowStream
    documents: Callable[[list], Columns]
    packer: Blocks
    pending: list[dict] = field(default_factory=list)

    def blocks(self) -> Iterator[dict]:
        """Endless packed blocks (tokenized READ_BATCH documents at a time)."""
        texts = self.rows.texts()
        while True:
            while not self.pending:
                batch = [next(texts) for _ in range(READ_BATCH)]
                packed = self.packer.add(self.documents(batch))
                columns = list(packed)
                self.pending = [
                    dict(zip(columns, values, strict=True))
                    for values in zip(*packed.values(), strict=True)
                ]
            yield self.pending.pop(0)

    def state_dict(self) -> dict:
        """Position, carry and unused blocks."""
        return {"position": self.rows.position, **self.packer.state_dict(), "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`."""
        # a position saved before `kept` was counted kept some row: its pass is not empty
        self.rows.position = {"kept": 1, **state["position"]}
        self.packer.load_state_dict(state)
        self.pending = state["pending"]


@dataclass(frozen=True)
class ShardSource:
    """Which rows a stream reads: shard `index` of `count` of train source `path` (named
    `key` in messages), in the file orders of run seed `seed`."""

    path: str
    key: str
    index: int
    count: int
    seed: int

    def rows(self, data: DataConfig) -> RowStream:
        """Its texts."""
        return RowStream(self.path, self.key, data, self.index, self.count, self.seed)


def document_blocks(
    documents: Callable[[list[str]], Columns], data: DataConfig, source: ShardSource
) -> SourceBlocks:
    """MLM/CLM: the source's texts as `documents` tokenize them, packed into max_length
    blocks (the rest carried into the next)."""
    return SourceBlocks(source.rows(data), documents, Packer(data.max_length))


class ShardStream:
    """One shard's blocks from weighted sources through a seeded shuffle buffer; each block
    gets a masking seed from the shard's running count."""

    def __init__(
        self,
        sources: list[SourceBlocks],
        weights: list[float],
        buffer_size: int,
        seed: int,
        shard: int,
    ) -> None:
        self.sources, self.weights = sources, weights
        self.buffer_size, self.seed, self.shard = buffer_size, seed, shard
        self.rng = random.Random(hash_seed(seed, shard))
        self.buffer: list[dict] = []
        self.emitted = 0

    def examples(self) -> Iterator[dict]:
        """Endless shuffled blocks; the state is exact between any two of them."""
        streams = [source.blocks() for source in self.sources]
        picks = range(len(streams))
        while True:
            while len(self.buffer) < self.buffer_size:
                source = self.rng.choices(picks, self.weights)[0]
                self.buffer.append(next(streams[source]))
            chosen = self.rng.randrange(len(self.buffer))
            block = self.buffer[chosen]
            self.buffer[chosen] = self.buffer[-1]
            self.buffer.pop()
            self.emitted += 1
            yield {**block, "seed": example_seed(self.seed, self.shard, self.emitted)}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue with the very next block."""
        version, internal, gauss = self.rng.getstate()
        return {
            "sources": [source.state_dict() for source in self.sources],
            "buffer": self.buffer,
            "rng": [version, list(internal), gauss],
            "emitted": self.emitted,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` (call before `examples()`)."""
        for source, saved in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(saved)
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.buffer = state["buffer"]
        self.emitted = state["emitted"]


class TrainStream:
    """This process's micro-batches of the global batches drawn from the shards.

    A global batch of `global_batch` blocks is `global_batch / shards` consecutive blocks of
    shard 0, then of shard 1, and so on; process `rank` of `world` takes the rank-th
    world-th of it. A process reads the shards its slice touches: its own one when there
    are as many shards as processes, several after a resume on fewer processes, and on more
    processes a shard shared by two is read by both (each keeps its part)."""

    def __init__(
        self,
        make_shard: Callable[[int, int], ShardStream],
        global_batch: int,
        world: int,
        rank: int,
    ) -> None:
        self.make_shard, self.global_batch = make_shard, global_batch
        self.world, self.rank = world, rank
        self.shards = self._deal(world)

    def _deal(self, count: int) -> dict[int, ShardStream]:
        """The shards (of `count`) that this process's slice of a global batch touches."""
        self.count = count
        per_rank, per_shard = self.global_batch // self.world, self.global_batch // count
        first, last = self.rank * per_rank, (self.rank + 1) * per_rank - 1
        touched = range(first // per_shard, last // per_shard + 1)
        return {shard: self.make_shard(shard, count) for shard in touched}

    def micro_batches(self, micro_batch_size: int, collate: Callable) -> Iterator[dict]:
        """Collated micro-batches of `micro_batch_size` blocks, endless; every shard is
        advanced by a whole step before the step's first micro-batch, so the state between
        two steps is exact."""
        per_rank, per_shard = self.global_batch // self.world, self.global_batch // self.count
        mine = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        streams = {shard: stream.examples() for shard, stream in self.shards.items()}
        while True:
            step = []
            for shard, examples in streams.items():
                blocks = [next(examples) for _ in range(per_shard)]
                step += [b for i, b in enumerate(blocks, shard * per_shard) if i in mine]
            for start in range(0, per_rank, micro_batch_size):
                yield collate(step[start : start + micro_batch_size])

    def state_dict(self) -> dict:
        """The shard count and the state of each shard this process reads."""
        states = {str(shard): stream.state_dict() for shard, stream in self.shards.items()}
        return {"shards": self.count, "states": states}

    def load_state_dict(self, saved: list[dict]) -> None:
        """Continue from the `state_dict()` of every process that saved (call before
        `micro_batches()`): the saved shards are dealt out to this run's processes."""
        if "shards" not in saved[0]:  # saved before the shard count was: process i, shard i
            saved = [{"shards": len(saved), "states": {str(i): s}} for i, s in enumerate(saved)]
        states = {shard: state for one in saved for shard, state in one["states"].items()}
        self.shards = self._deal(saved[0]["shards"])
        for shard, stream in self.shards.items():
            stream.load_state_dict(states[str(shard)])
