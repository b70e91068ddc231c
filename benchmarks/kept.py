"""A long section's finished runs, kept in its --work-dir, so that a rerun after a kill (a
preempted GPU job, a closed laptop, a session's end) goes on from the first unfinished run
instead of from the start: quality's full form is 18 runs, hours on 2 CPU cores.

A run is kept under a key made of everything that decides its result: what the section
says about it (method, side, seed, the form without its seed list) and a digest of the
code and recipes as they are on disk and of the library versions installed. A changed
recipe, form, engine or library runs it again instead of reporting a stale number; a commit
that changes only docs, tests or results keeps it. A record is written whole or not at all
(tmp file, fsync, rename: trainer.atomic), so a kill while writing it leaves nothing that a
rerun would trust.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import PACKAGES, ROOT
from trainer import atomic

# what decides a result (not the READMEs, tests or results files, which a commit or a run
# itself changes without changing what a run measures)
DECIDING = ("trainer/**/*.py", "configs/**/*.yaml", "benchmarks/*.py", "pyproject.toml")


@functools.cache
def code_version() -> str:
    """A digest of the code and recipes that decide a run's result, as they are on disk
    (committed or not), and of the library versions installed. Read once per process: the
    code must not change under a running benchmark anyway."""
    digest = hashlib.sha256()
    for package in ("torch", *PACKAGES):  # the versions installed: pyproject pins few
        digest.update(f"{package}=={metadata.version(package)}\0".encode())
    for path in sorted({p for pattern in DECIDING for p in ROOT.glob(pattern)}):
        digest.update(f"{path.relative_to(ROOT)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def run(path: Path, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """`compute()`'s result, written to `path` under `key`; or the result kept there by an
    earlier run under the same key and code, without computing it again."""
    wanted = json.loads(json.dumps({**key, "code": code_version()}))  # tuples as JSON has them
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("key") == wanted:
            print(f"[kept] {path.name}: from an earlier run of the same code", flush=True)
            return kept["result"]
    result = compute()
    atomic.write_json(path, {"key": wanted, "result": result})
    return result


def form_key(form: Any) -> dict[str, Any]:
    """A section's form as part of a run's key: without its lists of seeds, tasks and extra
    arms, which choose the runs and change none of them (a seed's run of a 3-seed form is
    kept for the same form with one seed)."""
    chosen = ("seeds", "tasks", "variants")
    return {k: v for k, v in dataclasses.asdict(form).items() if k not in chosen}


def slug(name: str) -> str:
    """A run's name as a file name: "LoRA + EDA" -> "lora---eda"."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
