"""The tokenization cache: encoded splits on disk, keyed by everything that shapes them.

A key is a hash of the data files' content (not their names or times), the tokenizer's
full serialized state, and every setting that changes the encoded result (task, columns,
max_length, labels, validation split and seed, packing). Equal keys mean equal tensors, so
a second run, a resumed run, or another rank or node loads the entry in seconds instead of
tokenizing again; a changed file or setting gives a new key and a new entry.

Correct on cluster filesystems without working locks. `flock` is node-local on NFS
(`nolock`, `local_lock`), Lustre (`localflock`) and BeeGFS, so the file lock only spares
the processes of one node the duplicate work (they wait for it, not for a collective: the
wait has no distributed timeout however long tokenization takes). What makes the cache
correct is the publishing: each builder writes into a directory of its own and renames it
into place; the first rename wins, and a later builder drops its copy and loads the winner's.
An entry is complete when its `meta.json`, written last, lists every file with its size
and SHA-256; an entry that does not match its list (half purged, truncated, damaged) is set
aside and rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from trainer import atomic
from trainer.errors import UserError

# Bump when the encoders change what they produce for the same input.
# 2: sft drops a row whose last answer alone exceeds max_length; 3: sft packs best-fit
FORMAT_VERSION = 3
META_NAME = "meta.json"
# Digests of corpus files, memoised per node (see `file_digest`)
DIGESTS_DIR = Path(tempfile.gettempdir()) / "trainer-file-digests"


def cache_root(setting: str) -> Path:
    """The folder `data.cache_dir` names. `auto` (the default) goes where the hub's own
    caches go, so that a cluster that points HF_HOME at shared scratch (not a home quota)
    gets ours there too: $HF_HOME/trainer/data, else $XDG_CACHE_HOME/trainer/data, else
    ~/.cache/trainer/data. Any other value is a path ($VARIABLES and ~ expanded)."""
    if setting != "auto":
        return Path(os.path.expandvars(setting)).expanduser()
    if os.environ.get("HF_HOME"):
        base = Path(os.environ["HF_HOME"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]).expanduser()
    else:
        base = Path.home() / ".cache"
    return base / "trainer" / "data"


def digest(value: object) -> str:
    """A stable hex digest of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, once per node: the first process of a node hashes it
    (in chunks: GB-sized corpora included) and the node's other ranks, waiting on a
    node-local lock, read the digest it left, keyed by the file's path, size, inode and
    modification time (a changed file is hashed again)."""
    stat = path.stat()
    identity = [str(path.resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns]
    DIGESTS_DIR.mkdir(mode=0o700, exist_ok=True)
    memo = DIGESTS_DIR / f"{digest(identity)[:32]}.json"
    with FileLock(str(memo.with_suffix(".lock"))):
        if memo.is_file():
            return json.loads(memo.read_text())["sha256"]
        with path.open("rb") as handle:
            found = hashlib.file_digest(handle, "sha256").hexdigest()
        atomic.write_json(memo, {"identity": identity, "sha256": found})
    return found


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what decides token ids: the fast tokenizer's full serialized pipeline
    (vocabulary, normalizer, pre-tokenizer, post-processor, added tokens) or, for a slow
    one, its vocabulary and init settings; plus the special tokens and the chat template
    either way."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return digest(
        [
            type(tokenizer).__name__,
            state,
            tokenizer.special_tokens_map,
            getattr(tokenizer, "init_kwargs", {}),
            getattr(tokenizer, "chat_template", None),  # it shapes sft's tokens and labels
        ]
    )


@dataclass
class Entry:
    """Encoded splits by name ("train/0", "validation", ...) and what the data defined."""

    splits: dict[str, datasets.Dataset]
    meta: dict


def save_entry(entry: Entry, folder: Path) -> Path:
    """Write an entry into a directory of this builder's own, list its files in meta.json
    (last), and rename it into place. When another builder's rename came first, drop this
    copy: both are the same tensors. Returns the published folder."""
    unique = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = folder.with_name(f".{folder.name}.{unique}.tmp")
    tmp.mkdir(mode=0o775, parents=True)  # no world write; the umask still applies
    try:
        for name, split in entry.splits.items():
            split.save_to_disk(str(tmp / name))
        files = {str(p.relative_to(tmp)): file_record(p) for p in tmp.rglob("*") if p.is_file()}
        atomic.write_json(
            tmp / META_NAME, {**entry.meta, "splits": list(entry.splits), "files": files}
        )
        try:
            tmp.rename(folder)
        except OSError:  # published by another builder meanwhile (or a damaged one is there)
            if not is_cached(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def file_record(path: Path) -> list:
    """[size, SHA-256] of a file."""
    with path.open("rb") as handle:
        return [path.stat().st_size, hashlib.file_digest(handle, "sha256").hexdigest()]


def load_entry(folder: Path) -> Entry:
    """An entry's splits, memory-mapped (loading costs no tokenization and little memory)."""
    meta = json.loads((folder / META_NAME).read_text())
    meta.pop("files", None)
    splits = {name: datasets.load_from_disk(str(folder / name)) for name in meta.pop("splits")}
    return Entry(splits, meta)


def is_cached(folder: Path) -> bool:
    """Whether `folder` holds a complete, undamaged entry: a meta.json that parses, every
    file it lists with its size, and (once per node, remembered in a node-local file) with
    its SHA-256. Later loads on the node check sizes only: reading GBs of arrow files at
    every start would cost more than it guards."""
    try:
        meta = (folder / META_NAME).read_text()
        files = json.loads(meta)["files"]
        if any((folder / name).stat().st_size != size for name, (size, _) in files.items()):
            return False
        memo = DIGESTS_DIR / f"entry-{digest([str(folder.resolve()), meta])[:32]}.json"
        if memo.is_file():
            return True
        if any(file_record(folder / name) != record for name, record in files.items()):
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    DIGESTS_DIR.mkdir(mode=0o700, exist_ok=True)
    atomic.write_json(memo, {"folder": str(folder)})
    return True


def set_aside(folder: Path) -> None:
    """Move an incomplete or damaged entry out of the way (atomically: of several processes
    that find it, one moves it), then delete it."""
    aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.damaged")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def lock(cache_dir: Path, name: str) -> FileLock:
    """The lock that lets one process of a node build while the node's others wait (no
    timeout: a build of a large corpus may take hours, and waiting here involves no
    collective). Not a guarantee across nodes: see the module's docstring."""
    try:
        cache_dir.mkdir(mode=0o775, parents=True, exist_ok=True)
    except OSError as err:  # read-only, not permitted, a file in the way (config checks most)
        raise UserError(f"data.cache_dir: can't create {cache_dir}: {err.strerror}") from None
    return FileLock(str(cache_dir / f"{name}.lock"))


def derived_folder(entry: Path, name: str, key: object) -> Path:
    """Where values computed from an entry's splits by more than the tokenizer go (a
    preference run's reference scores, which the model decides too): inside the entry, so
    that they go when the data they belong to goes, named by a digest of their own key."""
    return entry / "derived" / f"{name}-{digest(key)[:20]}"


def derived_entry(
    entry: Path, name: str, key: object, build: Callable[[], Entry]
) -> tuple[Entry, bool]:
    """Derived values (see `derived_folder`) as an entry is kept: published with its file
    list last, a damaged or half-written one rebuilt, never read; one builder per node at
    a time while the node's others wait, then read what it wrote. Returns the entry and
    whether it was already cached."""
    folder = derived_folder(entry, name, key)
    with lock(folder.parent, folder.name):
        cached = is_cached(folder)
        if not cached:
            set_aside(folder)
            save_entry(build(), folder)
    return load_entry(folder), cached
