"""Reading raw examples: files or hub datasets into checked rows, labels into ids.

Files are read with our own small readers rather than `datasets.load_dataset` so that a
bad row is reported as `file line N: ...` instead of a pyarrow traceback. Hub datasets go
through `datasets.load_dataset` (users have the hub; this machine does not).
"""

from __future__ import annotations

import csv
import glob
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import UserError
from trainer.tasks import tag_schemes
from trainer.text_files import decoded_lines, read_text

if TYPE_CHECKING:  # the task specs import this module, and config validation imports them
    from trainer.config import DataConfig

GLOB_CHARS = "*?["
ID_COLUMN = "id"  # an input's own name for itself, carried into its predictions
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".conll")


@dataclass
class Split:
    """Rows of one split plus where each came from, so later checks can name the row."""

    key: str  # the config key that named it, e.g. "data.validation"
    rows: list[dict]
    where: list[str]  # "train.csv row 12" for each row

    def __len__(self) -> int:
        return len(self.rows)


# --- readers: each yields (where, row) --------------------------------------------------


def _read_delimited(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(decoded_lines(path), delimiter=delimiter)
    for number, row in enumerate(reader, start=1):
        if None in row:  # more fields than the header names
            raise UserError(f"{path.name} row {number}: more fields than the header has")
        yield f"{path.name} row {number}", row


def json_object(line: str, where: str) -> dict:
    """A JSON line as a row (an object), or an error naming `where` (in memory and
    streamed alike)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    return row


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(decoded_lines(path), start=1):
        if line.strip():
            where = f"{path.name} line {number}"
            yield where, json_object(line, where)


def _read_json(path: Path) -> Iterator[tuple[str, dict]]:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _read_jsonl(path)  # .json files holding JSON lines are common
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UserError(f"{path.name}: expected a list of JSON objects (or JSON lines)")
    for number, row in enumerate(data, start=1):
        yield f"{path.name} row {number}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path.name}: not a readable parquet file ({err})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path.name} row {number}", row


def _read_text_lines(
    path: Path, column: str, number_column: str | None = None
) -> Iterator[tuple[str, dict]]:
    """One document per non-blank line (blank lines separate paragraphs, so they are skipped);
    with `number_column`, each row also holds its line number there (1 is the first line)."""
    for number, line in enumerate(decoded_lines(path), start=1):
        if line.strip():
            row = {column: line.rstrip("\r\n")}
            if number_column is not None:
                row[number_column] = number
            yield f"{path.name} line {number}", row


def _read_conll(path: Path, tokens_col: str, tags_col: str) -> Iterator[tuple[str, dict]]:
    """CoNLL column format: `token ... tag` per line, blank line between sentences."""
    tokens: list[str] = []
    tags: list[str] = []
    start = 1
    for number, line in enumerate(decoded_lines(path), start=1):
        fields = line.split()
        if fields and fields[0] == "-DOCSTART-":
            continue
        if fields and len(fields) < 2:
            raise UserError(f"{path.name} line {number}: expected 'TOKEN ... TAG' columns")
        if fields:
            if not tokens:
                start = number
            tokens.append(fields[0])
            tags.append(fields[-1])
        elif tokens:
            yield f"{path.name} line {start}", {tokens_col: tokens, tags_col: tags}
            tokens, tags = [], []
    if tokens:
        yield f"{path.name} line {start}", {tokens_col: tokens, tags_col: tags}


def _read_file(path: Path, rows: RowFormat, cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    suffix = path.suffix.lower()
    if suffix in rows.plain_text_suffixes:
        return rows.read_plain_text(path, cfg)
    readers = {
        ".csv": lambda: _read_delimited(path, ","),
        ".tsv": lambda: _read_delimited(path, "\t"),
        ".jsonl": lambda: _read_jsonl(path),
        ".json": lambda: _read_json(path),
        ".parquet": lambda: _read_parquet(path),
    }
    if suffix not in readers:
        raise UserError(f"{path.name}: a {suffix} file has no labels for {rows.name} rows")
    return readers[suffix]()


def load_hub(name: str, cfg: DataConfig, streaming: bool = False):
    """`NAME` or `NAME:SPLIT` from the Hugging Face hub (default split: train)."""
    import datasets

    dataset_name, _, split = name.partition(":")
    try:
        return datasets.load_dataset(
            dataset_name, cfg.hub_config, split=split or "train", streaming=streaming
        )
    except Exception as err:  # offline, unknown name, unknown split: all user-fixable
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load hub dataset '{name}': {first_line}") from None


def _read_hub(name: str, cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    for number, row in enumerate(load_hub(name, cfg), start=1):
        yield f"{name} row {number}", row


def looks_like_file(source: str) -> bool:
    """A source naming a file we can read, or a path, rather than a hub dataset id."""
    return (
        source.lower().endswith(FILE_SUFFIXES)
        or source.startswith(("/", ".", "~"))
        or any(char in source for char in GLOB_CHARS)
    )


def source_files(source: str, key: str) -> list[Path] | None:
    """The files a source names, a glob's matches in sorted order; None for a hub dataset."""
    path = Path(source).expanduser()
    if any(char in source for char in GLOB_CHARS):
        files = sorted(Path(name) for name in glob.glob(str(path), recursive=True))
        files = [file for file in files if file.is_file()]
        if not files:
            raise UserError(f"{key}: no file matches {source}")
        return files
    if path.is_file():
        return [path]
    if path.is_dir() and looks_like_file(source):  # a bare name may be a datasets folder
        raise UserError(
            f"{key}: {source} is a directory; name a file in it (or a glob such as "
            f"{path / '*.jsonl'})"
        )
    if looks_like_file(source):
        raise UserError(f"{key}: file not found: {source}")
    return None


class EmptyValue(UserError):
    """A row whose text, label or word list is empty: training rejects it, while
    `trainer data-stats` counts it (read_split_keeping_going)."""


def _open_source(
    source: str, key: str, rows: RowFormat, cfg: DataConfig
) -> Iterator[tuple[str, dict]]:
    files = source_files(source, key)
    if files is None:
        return _read_hub(source, cfg)
    return chain.from_iterable(_read_file(path, rows, cfg) for path in files)


def read_split(source: str, key: str, rows: RowFormat, cfg: DataConfig) -> Split:
    """Read and check every row of one split (a file, a glob's files in order, or a hub
    dataset); errors name `key`, the file and the row."""
    records = _open_source(source, key, rows, cfg)
    split = Split(key, [], [])
    try:
        for where, row in records:
            split.rows.append(rows.check(row, where, cfg))
            split.where.append(where)
    except UserError as err:
        raise UserError(f"{key}: {err}") from None
    if not split.rows:
        raise UserError(f"{key}: {source} holds no examples")
    return split


def read_split_keeping_going(
    source: str, key: str, rows: RowFormat, cfg: DataConfig
) -> tuple[Split, list[str]]:
    """Like read_split, but a row with an empty value is set aside rather than rejected:
    the checked rows, and where the empty ones were. For reports on the data; training
    stays strict. Other problems (a missing column, bad JSON) still stop the read."""
    records = _open_source(source, key, rows, cfg)
    split, empty = Split(key, [], []), []
    try:
        for where, row in records:
            try:
                split.rows.append(rows.check(row, where, cfg))
                split.where.append(where)
            except EmptyValue:
                empty.append(where)
    except UserError as err:
        raise UserError(f"{key}: {err}") from None
    return split, empty


def _text_row(row: dict, where: str, cfg: DataConfig) -> dict:
    """A text, non-empty."""
    text = _column(row, cfg, "text_column", where)
    if not isinstance(text, str) or not text.strip():
        raise EmptyValue(f"{where}: empty text in column '{cfg.text_column}'")
    return {"text": text}


def _text_with_id(row: dict, where: str, cfg: DataConfig) -> dict:
    """A text and, when the row has an `id` column, that id as it is: predictions carry it
    back, so that a row of the output joins to its input."""
    checked = _text_row(row, where, cfg)
    return {**checked, ID_COLUMN: row[ID_COLUMN]} if ID_COLUMN in row else checked


def _labelled_row(row: dict, where: str, cfg: DataConfig) -> dict:
    """A text and its class (a string or an integer, kept as a string)."""
    checked = _text_row(row, where, cfg)
    label = _column(row, cfg, "label_column", where)
    if label is None or (isinstance(label, str) and not label.strip()):
        raise EmptyValue(f"{where}: empty label in column '{cfg.label_column}'")
    if not isinstance(label, (str, int)) or isinstance(label, bool):
        raise UserError(f"{where}: label {label!r} must be a string or an integer")
    return {**checked, "label": str(label).strip()}


def _tagged_row(row: dict, where: str, cfg: DataConfig) -> dict:
    """Words and one tag per word."""
    tokens, tags = (
        _column(row, cfg, "tokens_column", where),
        _column(row, cfg, "tags_column", where),
    )
    if tokens == []:
        raise EmptyValue(f"{where}: '{cfg.tokens_column}' must be a non-empty list of words")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{where}: '{cfg.tokens_column}' must be a non-empty list of words")
    if not isinstance(tags, list) or len(tags) != len(tokens):
        raise UserError(f"{where}: '{cfg.tags_column}' must be a list as long as the tokens")
    return {"tokens": tokens, "tags": [str(tag) for tag in tags]}


LABEL_LIKE = ("label", "labels", "sentiment", "class", "category", "target", "y")


def _column(row: dict, cfg: DataConfig, key: str, where: str):
    """The value of the column `data.<key>` names; missing: one line with the columns the
    row has, and the one that looks meant (`data.text_column=review`)."""
    column = getattr(cfg, key)
    if column in row:
        return row[column]
    guess = _likely_column(row, key)
    hint = f"; set data.{key}={guess}" if guess is not None else ""
    columns = ", ".join(map(str, row))
    raise UserError(f"{where}: missing column '{column}' (columns: {columns}){hint}")


def _likely_column(row: dict, key: str) -> str | None:
    """The column a user most likely meant for `data.<key>`: the longest text for the
    text, a label-like name (or the shortest value) for the label, list values for words
    and tags."""
    if key in ("tokens_column", "tags_column"):
        lists = [name for name, value in row.items() if isinstance(value, list)]
        return lists[0 if key == "tokens_column" else -1] if lists else None
    texts = {name: value for name, value in row.items() if isinstance(value, str)}
    if key == "text_column":
        return max(texts, key=lambda name: len(texts[name]), default=None)
    named = [name for name in row if str(name).lower() in LABEL_LIKE]
    if named:
        return named[0]
    longest = max(texts, key=lambda name: len(texts[name]), default=None)
    others = [name for name, value in row.items() if name != longest and value is not None]
    return min(others, key=lambda name: len(str(row[name])), default=None)


def join_splits(splits: list[Split], key: str) -> Split:
    """Several splits as one (the rows of mixed sources, for label names and validation)."""
    return Split(
        key,
        [row for split in splits for row in split.rows],
        [where for split in splits for where in split.where],
    )


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out a seeded `fraction` of train (at least one row) as the validation split."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    count = max(1, round(len(order) * fraction))
    if count >= len(order):
        raise UserError(f"data.validation_split: {fraction} leaves no training rows")
    held, kept = sorted(order[:count]), sorted(order[count:])

    def pick(indices: list[int], key: str) -> Split:
        return Split(key, [train.rows[i] for i in indices], [train.where[i] for i in indices])

    return pick(kept, "data.train"), pick(held, "data.validation_split")


# --- labels ------------------------------------------------------------------------------


def _class_order(values: set[str]) -> list[str]:
    """Numeric labels by value, others alphabetically."""
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def _tag_order(values: set[str]) -> list[str]:
    """'O' first, then by entity type (B- before I- of one type)."""
    rest = sorted(values - {"O"}, key=lambda tag: (tag_schemes.entity_type(tag), tag))
    return (["O"] if "O" in values else []) + rest


def label_names_from(split: Split, rows: RowFormat) -> list[str]:
    """Class names in id order (see `RowFormat.order_labels`)."""
    return rows.order_labels({label for row in split.rows for label in rows.labels(row)})


def check_labels(split: Split, names: list[str], rows: RowFormat) -> None:
    """Reject a row whose label the model does not know, naming the row."""
    known = set(names)
    for row, where in zip(split.rows, split.where, strict=True):
        for label in rows.labels(row):
            if label not in known:
                raise UserError(
                    f"{split.key}: {where}: unknown label '{label}' "
                    f"(known: {', '.join(names[:20])})"
                )


# --- what a row of a task holds ------------------------------------------------------------


@dataclass(frozen=True)
class RowFormat:
    """What one row holds: the columns kept and checked, the labels in it (none for plain
    text), how label names are ordered into ids, and which plain-text files read as rows
    of it (text lines for language modelling, CoNLL columns for tagged words)."""

    name: str  # in messages: "text", "labelled text", "tagged words"
    check: Callable[[dict, str, DataConfig], dict]  # (row, where, data config) -> kept columns
    labels: Callable[[dict], list[str]] | None = None
    order_labels: Callable[[set[str]], list[str]] = sorted
    # the label names as a whole, against the data config (NER: a tag scheme they fit)
    check_names: Callable[[list[str], DataConfig], object] = lambda names, data: None
    plain_text_suffixes: tuple[str, ...] = ()
    read_plain_text: Callable[[Path, DataConfig], Iterator[tuple[str, dict]]] | None = None

    @property
    def labelled(self) -> bool:
        """Whether rows carry labels, whose names the training data defines."""
        return self.labels is not None


TEXT = RowFormat(
    "text",
    _text_row,
    plain_text_suffixes=(".txt",),
    read_plain_text=lambda path, cfg: _read_text_lines(path, cfg.text_column),
)
# what `trainer predict` reads: a text and its id (a .txt line's is its line number)
TEXT_WITH_ID = RowFormat(
    "text",
    _text_with_id,
    plain_text_suffixes=(".txt",),
    read_plain_text=lambda path, cfg: _read_text_lines(path, cfg.text_column, ID_COLUMN),
)
LABELLED_TEXT = RowFormat(
    "labelled text", _labelled_row, labels=lambda row: [row["label"]], order_labels=_class_order
)
TAGGED_WORDS = RowFormat(
    "tagged words",
    _tagged_row,
    labels=lambda row: row["tags"],
    order_labels=_tag_order,
    check_names=lambda names, data: tag_schemes.resolve(data.tag_scheme, names),
    plain_text_suffixes=(".txt", ".conll"),
    read_plain_text=lambda path, cfg: _read_conll(path, cfg.tokens_column, cfg.tags_column),
)
