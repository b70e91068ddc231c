"""`trainer data-stats`: what the data of a run config looks like, before training on it.

Per split (train and validation, as the run defines them, `validation_split` included):
rows; token lengths with the run's tokenizer (only the tokenizer and the model's config are
loaded, never its weights); for fine-tuning, the rows truncated at `data.max_length` and a
suggested max_length; the label balance; duplicate and empty rows; and the texts that train
and validation share. MLM/CLM texts are packed, not truncated: the total tokens and the
packed blocks are given instead.

Definitions, so that every figure can be checked by hand:
- token lengths are what the encoding for the task produces before truncation (special
  tokens included; CLM: the document plus its EOS);
- percentiles are nearest-rank: p-th = sorted_lengths[ceil(p/100 * n) - 1], a length that
  occurs in the data;
- suggested max_length = p99 rounded up to a multiple of 8 (friendly to GPU kernels),
  capped at the model's maximum positions: at most 1% of the rows are truncated;
- a duplicate row repeats the exact text of an earlier row of its split (NER: the words
  joined by spaces); `conflicting_labels` counts texts whose copies disagree on the label;
- an empty row has an empty text, label or word list: training rejects it, this counts it;
- sft (`truncation`): of the rows over max_length, `answer_too_long` are those whose last
  answer, from its first token to the row's end, leaves no room for a prompt token: both
  policies drop them (counted in the run summary). keep_end cuts the start of the others;
  drop drops every row over max_length. A duplicate repeats a whole conversation or pair.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from trainer import atomic, progress
from trainer.config import RunConfig
from trainer.data.class_weights import label_counts
from trainer.data.prepare import source_key, task_tokenizer
from trainer.data.read import (
    Split,
    carve_validation,
    join_splits,
    read_split_keeping_going,
)
from trainer.data.sources import train_sources
from trainer.errors import UserError
from trainer.model.load import load_model_config, load_tokenizer
from trainer.tasks.registry import TASKS
from trainer.tasks.spec import TaskSpec

PERCENTILES = (50, 95, 99)
MULTIPLE = 8  # suggested max_length is rounded up to this
EXAMPLES_SHOWN = 10  # `where`s of empty and duplicate rows kept in the report


def read_for_stats(cfg: RunConfig) -> list[tuple[str, Split, list[str]]]:
    """(name, rows, where the empty rows were) for train and validation as training
    would split them; empty rows are set aside instead of failing the read. Several train
    sources are reported together, as the train split (each carved as training does)."""
    sources, rows = train_sources(cfg.data), TASKS[cfg.task].rows
    reads = [
        read_split_keeping_going(s.path, source_key(i, len(sources)), rows, cfg.data)
        for i, s in enumerate(sources)
    ]
    empty = [where for _, found in reads for where in found]
    trains = [split for split, _ in reads]
    if cfg.data.validation_split:
        pairs = [carve_validation(t, cfg.data.validation_split, cfg.train.seed) for t in trains]
        held = join_splits([h for _, h in pairs], "data.validation_split")
        kept = join_splits([k for k, _ in pairs], "data.train")
        return [("train", kept, empty), ("validation", held, [])]
    splits = [("train", join_splits(trains, "data.train"), empty)]
    if cfg.data.validation:
        validation = read_split_keeping_going(
            cfg.data.validation, "data.validation", rows, cfg.data
        )
        splits.append(("validation", *validation))
    return splits


def row_text(row: dict) -> str:
    """The text a row stands for (NER: its words joined by spaces; sft: the whole
    conversation or prompt/completion pair, as JSON)."""
    if "tokens" in row:
        return " ".join(row["tokens"])
    return row["text"] if "text" in row else json.dumps(row, ensure_ascii=False, sort_keys=True)


def percentile(ordered: list[int], p: float) -> int:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def length_stats(lengths: list[int]) -> dict | None:
    """Mean, p50, p95, p99 and max of the token lengths (None for no rows)."""
    if not lengths:
        return None
    ordered = sorted(lengths)
    stats = {"mean": round(sum(ordered) / len(ordered), 2)}
    stats |= {f"p{p}": percentile(ordered, p) for p in PERCENTILES}
    return stats | {"max": ordered[-1]}


def suggest_max_length(p99: int, max_positions: int | None) -> int:
    """p99 rounded up to a multiple of 8, capped at the model's maximum positions."""
    suggested = -(-p99 // MULTIPLE) * MULTIPLE
    return min(suggested, max_positions) if max_positions else suggested


def packed_blocks(lengths: list[int], max_length: int) -> int:
    """Blocks data/encode.py packs: full blocks of all the tokens (the packer carries what
    does not fill a block into the next; with several sources, one fewer at most each)."""
    return sum(lengths) // max_length


def repeated_texts(split: Split) -> dict:
    """Rows repeating an earlier row's text, and texts whose copies disagree on the label."""
    labels_of: dict[str, set] = defaultdict(set)
    repeats = []
    for row, where in zip(split.rows, split.where, strict=True):
        text = row_text(row)
        if text in labels_of:
            repeats.append(where)
        labels_of[text].add(row.get("label") or tuple(row.get("tags", ())))
    conflicting = sum(len(labels) > 1 for labels in labels_of.values())
    return {
        "duplicate_rows": len(repeats),
        "duplicate_where": repeats[:EXAMPLES_SHOWN],
        "conflicting_labels": conflicting,
    }


def label_balance(split: Split, spec: TaskSpec) -> dict[str, dict]:
    """Count and share of each label (NER: of each tag over all words), most common first."""
    counts = label_counts(split, spec.rows)
    total = sum(counts.values()) or 1
    return {
        label: {"count": count, "share": round(count / total, 4)}
        for label, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    }


def split_stats(
    split: Split,
    empty: list[str],
    lengths: list[int],
    cfg: RunConfig,
    cap: int | None,
    tokenizer: PreTrainedTokenizerBase,
) -> dict:
    """Every figure of one split (see the module docstring for the definitions)."""
    spec = TASKS[cfg.task]
    stats = {"key": split.key, "rows": len(split), "tokens": length_stats(lengths)}
    stats |= {"empty_rows": len(empty), "empty_where": empty[:EXAMPLES_SHOWN]}
    stats |= repeated_texts(split)
    max_length = cfg.data.max_length
    if spec.packed:
        del stats["conflicting_labels"]  # texts without labels
        return stats | {
            "total_tokens": sum(lengths),
            "packed_blocks": packed_blocks(lengths, max_length),
        }
    truncated = sum(length > max_length for length in lengths)
    stats |= {
        "truncated_rows": truncated,
        "truncated_share": round(truncated / len(lengths), 4) if lengths else 0.0,
        "suggested_max_length": suggest_max_length(stats["tokens"]["p99"], cap)
        if lengths
        else None,
    }
    if spec.truncation is not None:  # sft: what each data.truncation policy does
        stats["truncation"] = spec.truncation(tokenizer, split.rows, cfg.data)
    if not spec.has_labels:
        del stats["conflicting_labels"]
        return stats
    return stats | {"labels": label_balance(split, spec)}


def overlap(train: Split, validation: Split) -> dict:
    """Texts found in both splits, and the validation rows that hold one of them."""
    train_texts = {row_text(row) for row in train.rows}
    validation_texts = [row_text(row) for row in validation.rows]
    rows = sum(text in train_texts for text in validation_texts)
    return {
        "texts": len(train_texts & set(validation_texts)),
        "validation_rows": rows,
        "validation_share": round(rows / len(validation_texts), 4) if validation_texts else 0.0,
    }


def max_positions(cfg: RunConfig) -> int | None:
    """The longest input the model takes, from its config (no weights are loaded)."""
    config = load_model_config(cfg.model, None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def data_stats(cfg: RunConfig) -> dict:
    """The whole report as a JSON-ready dict."""
    splits, spec = read_for_stats(cfg), TASKS[cfg.task]
    tokenizer = task_tokenizer(cfg, lambda: load_tokenizer(cfg.model, spec))
    cap = None if spec.packed else max_positions(cfg)
    lengths = {}
    for name, split, _ in splits:
        with progress.counting(len(split), f"tokenize {name}"):
            lengths[name] = spec.lengths(tokenizer, split.rows)
    return {
        "task": cfg.task,
        "tokenizer": cfg.model.name_or_path,
        "max_length": cfg.data.max_length,
        "model_max_positions": cap,
        "splits": {
            name: split_stats(split, empty, lengths[name], cfg, cap, tokenizer)
            for name, split, empty in splits
        },
        "overlap": overlap(splits[0][1], splits[1][1]) if len(splits) == 2 else None,
    }


def _count_share(count: int, share: float) -> str:
    return f"{count} ({share:.1%})"


def _table_rows(report: dict) -> list[tuple[str, list]]:
    """(label, value per split) for the printed table."""
    splits = list(report["splits"].values())
    rows: list[tuple[str, list]] = [("rows", [s["rows"] for s in splits])]
    rows += [("empty rows", [s["empty_rows"] for s in splits])]
    rows += [("duplicate rows", [s["duplicate_rows"] for s in splits])]
    if "conflicting_labels" in splits[0]:
        rows += [("texts with conflicting labels", [s["conflicting_labels"] for s in splits])]
    for stat in ("mean", "p50", "p95", "p99", "max"):
        rows.append((f"tokens {stat}", [(s["tokens"] or {}).get(stat, "-") for s in splits]))
    if "packed_blocks" in splits[0]:
        rows.append(("total tokens", [s["total_tokens"] for s in splits]))
        rows.append((f"blocks of {report['max_length']}", [s["packed_blocks"] for s in splits]))
        return rows
    rows.append(
        (
            f"truncated at {report['max_length']}",
            [_count_share(s["truncated_rows"], s["truncated_share"]) for s in splits],
        )
    )
    rows.append(("suggested max_length", [s["suggested_max_length"] for s in splits]))
    if "truncation" in splits[0]:
        rows += _truncation_rows([s["truncation"] for s in splits])
    labels = list(dict.fromkeys(label for s in splits for label in s.get("labels", {})))
    for label in labels:
        cells = [s["labels"].get(label, {"count": 0, "share": 0.0}) for s in splits]
        rows.append((f"label {label}", [_count_share(c["count"], c["share"]) for c in cells]))
    return rows


def _truncation_rows(counts: list[dict]) -> list[tuple[str, list]]:
    """sft: the rows over max_length as each data.truncation policy treats them."""
    return [
        ("keep_end: prompt cut", [c["keep_end"]["prompt_cut"] for c in counts]),
        ("keep_end: dropped", [c["keep_end"]["dropped"] for c in counts]),
        ("drop: dropped", [c["drop"]["dropped"] for c in counts]),
        ("answer alone too long", [c["answer_too_long"] for c in counts]),
    ]


def format_report(report: dict) -> str:
    """The report as a table with one column per split, then notes on what to look at."""
    names = list(report["splits"])
    rows = _table_rows(report)
    width = max(len(label) for label, _ in rows) + 2
    column = max(14, *(len(str(v)) + 2 for _, values in rows for v in values))
    lines = [f"{report['task']}, tokenizer {report['tokenizer']}"]
    lines.append(" " * width + "".join(f"{name:>{column}}" for name in names))
    lines += [
        f"{label:<{width}}" + "".join(f"{v!s:>{column}}" for v in values) for label, values in rows
    ]
    for name, split in report["splits"].items():
        for what in ("empty", "duplicate"):
            where, count = split[f"{what}_where"], split[f"{what}_rows"]
            if where:
                more = f" and {count - len(where)} more" if count > len(where) else ""
                lines.append(f"{name}: {what} rows at {', '.join(where)}{more}")
    if report["overlap"] is not None:
        shared = report["overlap"]
        lines.append(
            f"train/validation overlap: {shared['texts']} texts in both splits, "
            f"{shared['validation_rows']} validation rows ({shared['validation_share']:.1%})"
        )
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> Path:
    """Write the report as JSON; a folder that can't be written is a one-line error."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise UserError(f"--json: could not write {path}: {err.strerror or err}") from None
    return path
