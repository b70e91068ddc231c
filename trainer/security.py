"""What a run must not leak, load or leave open: secrets, checkpoints from elsewhere,
world-writable files.

Secret names are shared by the run config (what goes to config.yaml, checkpoints and
trackers) and the cluster profile's `env` block (what `trainer submit` would write into
job.sbatch). A name is matched whole or by its last word, never as a substring: `tokenizer`
or `mask_token_fraction` hold no secret. Mappings keyed by label names are never redacted: a
class named `spam_key` is data, and hiding its weight would hide a changed class weight
from the resume check.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SECRET_NAMES = frozenset({"token", "password", "secret"})
SECRET_SUFFIXES = ("_token", "_key", "_secret", "_password")
# Keys whose values map label names (the user's classes) to numbers: never secrets.
LABEL_KEYED = frozenset({"class_weights", "label2id"})
REDACTED = "<redacted>"


def is_secret(name: object) -> bool:
    """`token`, `password`, `secret`, or a name ending in `_token`, `_key`, `_secret`,
    `_password` (`hub_token`, `WANDB_API_KEY`), in any case."""
    lowered = str(name).lower()
    return lowered in SECRET_NAMES or lowered.endswith(SECRET_SUFFIXES)


def redact(values: Any) -> Any:
    """A copy with the value of every secret-named key replaced, at any depth, except
    inside label-keyed mappings: what goes to files, logs and trackers never holds one."""
    if isinstance(values, dict):
        return {
            key: REDACTED if is_secret(key) else value if key in LABEL_KEYED else redact(value)
            for key, value in values.items()
        }
    if isinstance(values, list):
        return [redact(value) for value in values]
    return values


def untrusted_resume(resume: str, output_dir: str, trusted: bool) -> list[str]:
    """The refusal of `train.resume=PATH` outside the run (empty: allowed). Loading a
    checkpoint unpickles parts of it (DeepSpeed's files, FSDP's DCP `.metadata`), so one
    from someone else's folder can run their code: only when the user says so."""
    if resume in ("auto", "never") or trusted:
        return []
    run_dir = Path(output_dir).expanduser().resolve()
    if Path(resume).expanduser().resolve().is_relative_to(run_dir):
        return []
    return [
        f"train.resume: {resume} is outside output_dir {run_dir}; loading a checkpoint "
        "unpickles parts of it (DeepSpeed, FSDP), so one from elsewhere can run code: set "
        "train.resume_trusted=true if you trust its source"
    ]


@contextlib.contextmanager
def no_world_write() -> Iterator[None]:
    """Add o-w to the process umask while a command runs, so that nothing it creates (run
    directory, checkpoints and their `.partial` folders, logs, the files torch, safetensors,
    Accelerate and DeepSpeed write, cache entries) is writable by everyone: a world-writable
    checkpoint could be replaced by anyone with a pickle of theirs. The user's umask is kept
    otherwise (022 and 077 unchanged, 000 becomes 002); the umask is what every library's
    mkdir and open honour, where a mode would have to be passed to each of them."""
    previous = os.umask(0o002)
    os.umask(previous | 0o002)
    try:
        yield
    finally:
        os.umask(previous)


def umask_modes(folder: Path) -> None:
    """Give the weight files under `folder` the mode of every other file there (0o666 less
    the umask). safetensors 0.8 writes through a tmp file it creates 0600 and renames
    (safetensors#782, unfixed in 0.8.x), so weights were readable by their owner only while
    their config was not: a model trained by one user, served by another, failed to load."""
    umask = os.umask(0o077)  # read it (a restrictive value in between, never 0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for path in folder.rglob("*.safetensors"):
        if path.is_symlink():  # an adapter's link to its base's weights: not ours to change
            continue
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)
