"""The data a run trains on: read, checked and encoded once, then cached for every rank,
node and later run (see data/cache.py for the key and the locking).

`trainer prepare CONFIG` (commands/prepare.py) does this ahead of time, without loading the
model: a SLURM job runs it once before `srun`, so that no rank of a large job sits in set-up
tokenizing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from trainer import progress
from trainer.config import RunConfig
from trainer.data import cache
from trainer.data.read import (
    Split,
    carve_validation,
    check_labels,
    join_splits,
    label_names_from,
    load_hub,
    read_split,
    source_files,
)
from trainer.data.sources import train_sources
from trainer.logs import get_logger
from trainer.tasks.registry import task_spec

logger = get_logger(__name__)


@dataclass
class PreparedData:
    """Encoded splits: one train dataset per `data.train` source (none when streaming)."""

    train: list[datasets.Dataset]
    validation: datasets.Dataset | None
    label_names: list[str] | None
    cache: dict  # status (hit, built, off), folder, seconds
    dropped_rows: dict[str, int]  # rows data.truncation=drop left out, per split


def source_key(number: int, count: int) -> str:
    """The config key that names train source `number` of `count` in messages."""
    return "data.train" if count == 1 else f"data.train[{number}]"


def read_splits(cfg: RunConfig) -> tuple[list[Split], Split | None, list[str] | None]:
    """Train rows per source and validation rows, checked, with the label names the
    training data defines (over all sources). A validation_split is carved from each
    source, so the held-out rows keep the mixture's composition."""
    rows = task_spec(cfg).rows
    sources = [] if cfg.data.streaming else train_sources(cfg.data)
    trains = [
        read_split(source.path, source_key(i, len(sources)), rows, cfg.data)
        for i, source in enumerate(sources)
    ]
    validation = None
    if cfg.data.validation:
        validation = read_split(cfg.data.validation, "data.validation", rows, cfg.data)
    elif cfg.data.validation_split:
        pairs = [carve_validation(t, cfg.data.validation_split, cfg.train.seed) for t in trains]
        trains = [kept for kept, _ in pairs]
        validation = join_splits([held for _, held in pairs], "data.validation_split")
    label_names = None
    if rows.labelled and trains:
        label_names = label_names_from(join_splits(trains, "data.train"), rows)
        if validation is not None:
            check_labels(validation, label_names, rows)
    return trains, validation, label_names


def _fingerprint(source: str, key: str, cfg: RunConfig) -> list:
    """What identifies a source's content: each file's SHA-256, or the hub dataset's
    fingerprint (which `datasets` derives from the downloaded data)."""
    files = source_files(source, key)
    if files is None:
        return [source, cfg.data.hub_config, load_hub(source, cfg.data)._fingerprint]
    return [[path.name, cache.file_digest(path)] for path in files]


# sft's settings that change the encoded rows, not only how they are batched: which columns
# hold the turns, which tokens are targets, how a long row is cut, whether rows are packed
CHAT_KEYS = (
    "prompt_column",
    "completion_column",
    "messages_column",
    "train_on_prompt",
    "last_turn_only",
    "truncation",
    "packing",
)


def data_key(cfg: RunConfig) -> str:
    """The part of the cache key that the data and the settings decide."""
    sources = [] if cfg.data.streaming else train_sources(cfg.data)
    data = cfg.data
    split = {"fraction": data.validation_split, "seed": cfg.train.seed}
    return cache.digest(
        {
            "format": cache.FORMAT_VERSION,
            "task": cfg.task,
            "train": [
                _fingerprint(s.path, source_key(i, len(sources)), cfg)
                for i, s in enumerate(sources)
            ],
            "validation": data.validation and _fingerprint(data.validation, "data.validation", cfg),
            "validation_split": split if data.validation_split else None,
            "columns": [data.text_column, data.label_column, data.tokens_column, data.tags_column],
            "max_length": data.max_length,
            "chat": [getattr(data, name) for name in CHAT_KEYS],
            # sentence pairs are drawn with the seed when they are made
            "next_sentence_seed": cfg.train.seed if cfg.mlm.next_sentence else None,
        }
    )[:20]


def encode(cfg: RunConfig, splits, tokenizer: PreTrainedTokenizerBase) -> cache.Entry:
    """Tokenize (and for MLM/CLM pack) every split."""
    trains, validation, names = splits
    encoder = task_spec(cfg).encode
    named = {f"train-{i}": split for i, split in enumerate(trains)}
    if validation is not None:
        named["validation"] = validation
    encoded = {}
    for name, split in named.items():
        with progress.counting(len(split), f"tokenize {name}"):
            encoded[name] = encoder(split, tokenizer, names, cfg.data)
    rows = {name: len(split) for name, split in named.items()}
    return cache.Entry(encoded, {"label_names": names, "rows": rows, "task": cfg.task})


def task_tokenizer(
    cfg: RunConfig, load_tokenizer: Callable[[], PreTrainedTokenizerBase]
) -> PreTrainedTokenizerBase:
    """The tokenizer as the task trains with it: for sft with data.chat_template set on it,
    before its fingerprint keys the cache and before it is saved with the model."""
    tokenizer = load_tokenizer()
    prepare = task_spec(cfg).prepare_tokenizer
    if prepare is not None:
        prepare(tokenizer, cfg.data)
    return tokenizer


def prepare_data(
    cfg: RunConfig, load_tokenizer: Callable[[], PreTrainedTokenizerBase]
) -> tuple[PreparedData, PreTrainedTokenizerBase]:
    """The encoded data and the tokenizer, from the cache when it holds them.

    Rows are read and checked before the tokenizer is loaded (a bad row fails in seconds,
    before any hub request) unless a cache entry for the same data exists: then they were
    checked when it was built, and with the same tokenizer they are not read at all."""
    started = time.monotonic()
    load_tokenizer = functools.partial(task_tokenizer, cfg, load_tokenizer)
    if cfg.data.cache_dir is None:
        splits = read_splits(cfg)
        tokenizer = load_tokenizer()
        entry, status, folder = encode(cfg, splits, tokenizer), "off", None
    else:
        cache_dir = cache.cache_root(cfg.data.cache_dir)
        prefix = data_key(cfg)
        with cache.lock(cache_dir, prefix):
            checked = any(cache_dir.glob(f"{prefix}-*/{cache.META_NAME}"))
            splits = None if checked else read_splits(cfg)
            tokenizer = load_tokenizer()
            folder = cache_dir / f"{prefix}-{cache.tokenizer_fingerprint(tokenizer)[:20]}"
            status = "hit"
            if not cache.is_cached(folder):
                cache.set_aside(folder)  # half purged or damaged: rebuilt, never read
                cache.save_entry(encode(cfg, splits or read_splits(cfg), tokenizer), folder)
                status = "built"
        entry = cache.load_entry(folder)
    logger.debug("tokenized data: cache %s (%s)", status, folder or "data.cache_dir is null")
    count = sum(name.startswith("train-") for name in entry.splits)
    # rows data.truncation=drop left out; packed tasks' blocks are no rows to count
    dropped = (
        {}
        if task_spec(cfg).packed
        else {
            name: rows - len(entry.splits[name])
            for name, rows in entry.meta["rows"].items()
            if rows > len(entry.splits[name])
        }
    )
    return PreparedData(
        [entry.splits[f"train-{i}"] for i in range(count)],
        entry.splits.get("validation"),
        entry.meta["label_names"],
        {
            "status": status,
            "folder": str(folder) if folder else None,
            "seconds": round(time.monotonic() - started, 3),
        },
        dropped,
    ), tokenizer
