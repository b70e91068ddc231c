"""Files written whole or not at all: a kill at any instant, or a full disk, leaves the old
file or the new one, never half of one.

The text goes to a tmp file of this writer's own (several processes may write the same
path), is fsynced, and renamed over the path; the directory is fsynced after the rename, so
that the new name survives a power loss or node crash too.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


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
