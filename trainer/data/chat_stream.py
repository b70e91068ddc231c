"""Streaming supervised fine-tuning rows (`data.streaming` with task sft): each row of a
shard read, checked and encoded as the in-memory path does it (data/chat_rows.py
`chat_row`, data/chat_encode.py `encoded_example`), then packed into max_length rows as the
examples come (or, without data.packing, one example a block, padded per micro-batch by the
collator). Sharding, mixing, shuffling and the saved position are data/stream.py's.

Packing on the fly cannot see the whole split, as `pack` does in memory: each call packs
the examples at hand (those of the rows it holds open, and the new ones) best-fit
decreasing, hands out the full rows and the fullest others, and keeps the `OPEN_ROWS`
least-filled rows open for the next examples. Their examples are in the checkpoint, so a
resumed run packs exactly as the uninterrupted one. Each packed example keeps its own
attention and position ids, as in memory (the collator's `example_lengths`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from trainer.data.chat_encode import all_dropped, best_fit, encoded_example, packed_rows
from trainer.data.chat_rows import chat_row
from trainer.data.read import json_object
from trainer.data.stream import RowStream, ShardSource, SourceBlocks, parquet_rows, text_lines
from trainer.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from transformers import PreTrainedTokenizerBase

    from trainer.config import DataConfig
    from trainer.data.encode import Columns

# Rows kept open for later examples: with the READ_BATCH examples of a call, enough to
# fill the rows about as well as packing the whole split does (README, "Streaming")
OPEN_ROWS = 8
UNPLACED = "\0row\0"  # a JSON line's place, until a message needs its line number


@dataclass
class ChatRowStream(RowStream):
    """One shard's sft examples from one source: JSON lines, parquet rows or hub rows in
    any of the three row formats (data.messages_column, prompt/completion columns,
    instruction/input/output), as {input_ids, labels}; rows data.truncation drops are
    skipped (counted in the position's `dropped`)."""

    tokenizer: PreTrainedTokenizerBase = field(kw_only=True)
    suffixes: ClassVar[tuple[str, ...]] = (".jsonl", ".parquet")

    def _read(self, path: Path, offset: int) -> Iterator[tuple[object, int]]:
        """Whole rows: a parquet file's as dicts, a JSON lines file's lines as text."""
        if path.suffix.lower() == ".parquet":
            return parquet_rows(path, offset, None)
        return text_lines(path, offset, "")

    def _kept(self, raw: object, path: Path, after: int) -> dict | None:
        """A file row's example; a problem names the row as the in-memory reader does
        (`train.jsonl line 7`, `train.parquet row 7`)."""
        if isinstance(raw, dict):  # parquet: `after` is the row's number
            return self._example(raw, f"{path.name} row {after}")
        try:
            return self._example(json_object(str(raw), UNPLACED), UNPLACED)
        except UserError as err:  # counting lines costs a read of the file: only now
            place = f"{path.name} line {line_number(path, after)}"
            raise UserError(str(err).replace(UNPLACED, place, 1)) from None

    def _hub_kept(self, row: dict, number: int) -> dict | None:
        """A hub row's example, named by its number in the shard."""
        shard = f" of shard {self.rank}" if self.world_size > 1 else ""
        return self._example(row, f"{self.source} row {number}{shard}")

    def _example(self, row: dict, where: str) -> dict | None:
        example = encoded_example(self.tokenizer, chat_row(row, where, self.data), where, self.data)
        if example is None:
            self.position["dropped"] = self.position.get("dropped", 0) + 1
        return example

    def _nothing_kept(self) -> str:
        """A pass whose rows data.truncation dropped, as in memory; or one with no row."""
        if self.position.get("dropped"):
            return all_dropped(self.source, self.data)
        return super()._nothing_kept()


def line_number(path: Path, after: int) -> int:
    """The number of the line that ends at byte `after` (its newline, if any, uncounted),
    counted a MiB at a time."""
    count, left = 0, after - 1
    with path.open("rb") as handle:
        while left > 0 and (chunk := handle.read(min(left, 1 << 20))):
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count + 1


class ExamplePacker:
    """Examples into rows of at most `max_length` tokens as they stream (see the module's
    docstring); its state is the examples of the rows it holds open."""

    def __init__(self, max_length: int, open_rows: int = OPEN_ROWS) -> None:
        self.max_length, self.open_rows = max_length, open_rows
        self.carry: Columns = {"input_ids": [], "labels": []}

    def add(self, documents: Columns) -> Columns:
        """The rows ready once `documents` (examples) join the open rows' examples."""
        held = {key: self.carry[key] + documents[key] for key in self.carry}
        rows = best_fit([len(ids) for ids in held["input_ids"]], self.max_length)
        filled = [sum(len(held["input_ids"][i]) for i in row) for row in rows]
        # the least filled first (sorted is stable: the same rows on every run)
        emptiest = sorted(range(len(rows)), key=filled.__getitem__)
        kept = {r for r in emptiest[: self.open_rows] if filled[r] < self.max_length}
        self.carry = {key: [held[key][i] for r in sorted(kept) for i in rows[r]] for key in held}
        return packed_rows(held, [row for r, row in enumerate(rows) if r not in kept])

    def state_dict(self) -> dict:
        """The open rows' examples (JSON-able)."""
        return {"carry": self.carry}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`."""
        self.carry = state["carry"]


class OnePerBlock:
    """Without data.packing: each example is a block of its own; nothing is held."""

    def add(self, documents: Columns) -> Columns:
        """The examples as they are."""
        return documents

    def state_dict(self) -> dict:
        """Nothing: every example was handed out."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


def _columns(examples: list[dict]) -> Columns:
    return {key: [example[key] for example in examples] for key in ("input_ids", "labels")}


def example_blocks(
    tokenizer: PreTrainedTokenizerBase, data: DataConfig, source: ShardSource
) -> SourceBlocks:
    """One shard of an sft train source as blocks: packed rows (data.packing) or single
    examples (SourceBlocks encodes READ_BATCH rows at a time)."""
    rows = ChatRowStream(
        source.path,
        source.key,
        data,
        source.index,
        source.count,
        source.seed,
        tokenizer=tokenizer,
    )
    packer = ExamplePacker(data.max_length) if data.packing else OnePerBlock()
    return SourceBlocks(rows, _columns, packer)
