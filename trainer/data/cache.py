"""The tokenization cache: encoded splits on disk, keyed by everything that shapes them.

A key is a hash of the data files' content (not their names or times), the tokenizer's
full serialized state, and every setting that changes the encoded result (task, columns,
max_length, labels, validation split and seed, packing). Equal keys mean equal tensors, so
a second run, a resumed run, or another rank or node loads the entry in seconds instead of
tokenizing again; a changed file or setting gives a new key and a new entry.

One process builds an entry while the others wait for a file lock, not for a collective:
the wait has no distributed timeout however long tokenization takes. The entry is written
under a temporary name and renamed into place, so nobody ever reads half of one. On a
shared filesystem (`data.cache_dir` on clusters) one process of the whole job builds it;
on node-local disks one per node does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

# Bump when the encoders change what they produce for the same input.
FORMAT_VERSION = 1
META_NAME = "meta.json"


def digest(value: object) -> str:
    """A stable hex digest of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks (GB-sized corpora included)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what decides token ids: the fast tokenizer's full serialized pipeline
    (vocabulary, normalizer, pre-tokenizer, post-processor, added tokens) or, for a slow
    one, its vocabulary and init settings; plus the special tokens either way."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return digest(
        [
            type(tokenizer).__name__,
            state,
            tokenizer.special_tokens_map,
            getattr(tokenizer, "init_kwargs", {}),
        ]
    )


@dataclass
class Entry:
    """Encoded splits by name ("train/0", "validation", ...) and what the data defined."""

    splits: dict[str, datasets.Dataset]
    meta: dict


def save_entry(entry: Entry, folder: Path) -> None:
    """Write an entry under a temporary name, then rename it into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, split in entry.splits.items():
        split.save_to_disk(str(tmp / name))
    meta = {**entry.meta, "splits": list(entry.splits)}
    (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
    tmp.rename(folder)


def load_entry(folder: Path) -> Entry:
    """An entry's splits, memory-mapped (loading costs no tokenization and little memory)."""
    meta = json.loads((folder / META_NAME).read_text())
    splits = {name: datasets.load_from_disk(str(folder / name)) for name in meta.pop("splits")}
    return Entry(splits, meta)


def is_cached(folder: Path) -> bool:
    """Whether `folder` holds a complete entry (the rename happens only after the write)."""
    return (folder / META_NAME).is_file()


def lock(cache_dir: Path, name: str) -> FileLock:
    """The lock that lets one process build while the others wait (no timeout: a build of
    a large corpus may take hours, and waiting here involves no collective)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir / f"{name}.lock"))
