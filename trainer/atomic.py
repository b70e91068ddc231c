"""Files written whole or not at all: a kill at any instant, or a full disk, leaves the old
file or the new one, never half of one.

The text goes to a tmp file of this writer's own (several processes may write the same
path), is fsynced, and renamed over the path; the directory is fsynced after the rename, so
that the new name survives a power loss or node crash too.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from trainer.errors import TrainingFailed

# A write that found no room: what safetensors ("... (os error 28)"), torch's legacy writer
# ("write(): fd 3 failed with File too large") and Python say, the errno's own text.
_NO_ROOM = tuple(os.strerror(number) for number in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT))
# torch.save's zip writer (C++ streams) loses the errno: a failed write shows only as a
# file position that did not advance, or as a stream error.
_TORCH_WRITER = ("PytorchStreamWriter failed writing", "unexpected pos", "iostream error")


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text`, atomically and durably."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_directory(path.parent)


def write_json(path: Path, value: Any, indent: int | None = 1) -> None:
    """`write_text` of strict JSON (a NaN is an error here: see run/records.finite)."""
    write_text(path, json.dumps(value, indent=indent, allow_nan=False))


def sync_directory(folder: Path) -> None:
    """Make the renames inside `folder` durable."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_failure(err: BaseException, where: Path) -> str | None:
    """Why a write under `where` failed, when it was the file system's doing: an OSError
    (disk full, over a size limit, unwritable), or the disk-full errors that safetensors
    and torch raise as SafetensorError / RuntimeError with the cause only in their text.
    None for anything else, so that a bug keeps its traceback."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if not isinstance(err, (RuntimeError, SafetensorError)):
        return None
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    text = " ".join(str(link) for link in chain)
    for reason in _NO_ROOM:
        if reason in text:
            return reason
    if any(mark in text for mark in _TORCH_WRITER):
        return _NO_ROOM[0] if _free_bytes(where) < 1 << 20 else "torch.save could not write"
    return None


def _free_bytes(where: Path) -> int:
    """Bytes free for us on the file system of `where` (or of its nearest existing parent)."""
    while not where.exists() and where != where.parent:
        where = where.parent
    stats = os.statvfs(where)
    return stats.f_bavail * stats.f_frsize


@contextmanager
def stop_on_failed_write(what: Path, undo: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn a failed write of `what` (see `write_failure`) into TrainingFailed, one line and
    exit 3, after `undo` removed what was half written: a full disk must not leave a torn
    file or a half folder beside what was committed before."""
    try:
        yield
    except Exception as err:
        reason = write_failure(err, what)
        if reason is None:
            raise
        if undo is not None:
            undo()
        raise TrainingFailed(failed_write_message(str(what), reason)) from None


def failed_write_message(what: str, reason: str) -> str:
    """The one line a failed write stops with (the CLI adds `error: `)."""
    return f"could not write {what}: {reason}; the previous checkpoint is intact"
