"""`trainer predict`: a saved model's predictions on a file of texts, as jsonl.

The input is read before the model is loaded, so a bad file fails in a second. Several LoRA
adapters on one base, of one task or several, are named `NAME=DIR` (`--adapter`) and chosen
with `--use`; the rows take the chosen adapter's task format.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from trainer.atomic import write_text
from trainer.config import DataConfig
from trainer.data.read import ID_COLUMN, TEXT_WITH_ID, RowFormat, read_split
from trainer.errors import UserError
from trainer.inference import PredictOptions, Predictor
from trainer.model.saved import DEFAULT_ADAPTER, SavedModel
from trainer.tasks.registry import task_spec

INPUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")


def read_inputs(source: str, data: DataConfig, rows: RowFormat = TEXT_WITH_ID) -> list[dict]:
    """The inputs, each `{"text"}` plus its `id`: the text from `data.text_column` of a
    csv/tsv/jsonl/json/parquet file, with the row's `id` column when it has one, or one
    text per non-blank line of a .txt file, whose id is its line number. An sft model's
    rows (`rows`, its prediction head's) may hold `{"messages"}` instead of the text."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise UserError(f"--input: {source} is a directory; name a file in it")
    if not path.is_file():
        raise UserError(f"--input: file not found: {source}")
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise UserError(f"--input: {path.name}: expected one of {', '.join(INPUT_SUFFIXES)}")
    # read as plain text: only the text column is needed and checked (no labels, no tags)
    return read_split(str(path), "--input", rows, data).rows


def parse_adapters(items: Sequence[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` pairs from repeated --adapter options, each a distinct name."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--adapter: expected NAME=DIR, got '{item}'")
        if name in dict(pairs):
            raise UserError(f"--adapter: the name '{name}' is given twice")
        pairs.append((name, folder))
    return pairs


def _primary(model_dir: str, pairs: list[tuple[str, str]]) -> tuple[SavedModel, str, str | None]:
    """The folder loaded first, its adapter name and the base it goes on: MODEL_DIR itself,
    or, for a plain MODEL_DIR with --adapter options, the first adapter on MODEL_DIR."""
    saved = SavedModel.read(model_dir)
    if saved.is_adapter or not pairs:
        return saved, DEFAULT_ADAPTER, None
    name, folder = pairs[0]
    return SavedModel.read_adapter(folder, f"--adapter {name}={folder}"), name, model_dir


def _serving(
    primary: tuple[SavedModel, str, str | None], pairs: list[tuple[str, str]], use: str | None
) -> SavedModel:
    """The folder whose run settings (its text column) read the input: the adapter that
    `--use` picks (it may be of another task than the first), else the first one."""
    folders = dict(pairs)
    if use is None or use == primary[1] or use not in folders:
        return primary[0]  # an unknown --use name is reported once the adapters are loaded
    return SavedModel.read_adapter(folders[use], f"--adapter {use}={folders[use]}")


def _loaded(
    primary: tuple[SavedModel, str, str | None],
    pairs: list[tuple[str, str]],
    overrides: Sequence[str],
    precision: str,
    use: str | None,
) -> Predictor:
    saved, name, base = primary
    predictor = Predictor.from_saved(saved, overrides, precision, name, base)
    for other, other_folder in pairs[1:] if base else pairs:  # with a base, pairs[0] is loaded
        predictor.add_adapter(other, other_folder)
    if use is not None:
        predictor.use(use)
    return predictor


def load_predictor(
    model_dir: str,
    overrides: Sequence[str],
    precision: str,
    adapter_items: Sequence[str] = (),
    use: str | None = None,
) -> Predictor:
    """MODEL_DIR (its own adapter, if it is an adapter folder, is named `default`) plus the
    --adapter NAME=DIR ones; a plain MODEL_DIR with adapters is taken as their base."""
    pairs = parse_adapters(adapter_items)
    return _loaded(_primary(model_dir, pairs), pairs, overrides, precision, use)


def predict_file(
    model_dir: str,
    source: str,
    target: str,
    overrides: Sequence[str] = (),
    options: PredictOptions | None = None,
    adapter_items: Sequence[str] = (),
    use: str | None = None,
) -> dict:
    """Predict every input of `source` into jsonl `target`; returns rows, seconds, rows/s.
    The input is read before the model is loaded, so a bad file fails in a second."""
    options = options or PredictOptions()
    options.check()
    if Path(target).is_dir():  # found now, not after predicting every row
        raise UserError(f"--output: {target} is a directory; name the .jsonl file to write")
    pairs = parse_adapters(adapter_items)
    primary = _primary(model_dir, pairs)
    cfg = _serving(primary, pairs, use).run_config(overrides)
    inputs = read_inputs(source, cfg.data, task_spec(cfg).prediction.inputs)
    predictor = _loaded(primary, pairs, overrides, options.precision, use)
    started = time.perf_counter()
    predictions = predictor.predict(
        [row.get("messages", row.get("text")) for row in inputs], options
    )
    seconds = time.perf_counter() - started
    rows = [with_input(one, given) for one, given in zip(predictions, inputs, strict=True)]
    write_jsonl(Path(target), rows)
    return {"rows": len(rows), "seconds": round(seconds, 3), "rows_per_s": len(rows) / seconds}


def with_input(prediction: dict, given: dict) -> dict:
    """A prediction row led by its input's `id` (when it has one) and `text` (or
    `messages`), so that the output stands on its own and joins back to the input."""
    head = {ID_COLUMN: given[ID_COLUMN]} if ID_COLUMN in given else {}
    asked = {key: given[key] for key in ("text", "messages") if key in given}
    return {**head, **asked, **prediction}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """All rows at once (trainer/atomic.py): no half-written output file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
