"""Which checkpoint a run continues from, and whether it may.

A checkpoint folder counts only once its commit marker (`COMMIT.json`, a manifest of every
file's size and the SHA-256 of each 64 MiB piece of it) exists; the marker is written
last, after every process finished writing, and the folder is renamed from
`step-N.partial` to `step-N` after it. Resume checks the manifest again, so a truncated
or missing file sends it to the previous complete checkpoint instead of crashing the
restart.

Durable as well as atomic: every file is fsynced before the marker is written, and the
directories after the renames, so that after a power loss or a node crash the newest
checkpoint is whole before rotation deletes the older ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trainer import atomic
from trainer.errors import UserError
from trainer.run.records import read_records
from trainer.security import umask_modes

COMMIT_NAME = "COMMIT.json"
LOOP_STATE_NAME = "loop_state.json"  # the loop's counters (run/checkpoint.py); not HF
# Trainer's trainer_state.json, a file of another schema, which checkpoints were written
# with before: still read (`loop_state_file`)
OLD_STATE_NAME = "trainer_state.json"
HASH_PIECE = 64 << 20  # bytes of a file hashed on their own (manifest: a list per file)
HASH_THREADS = min(16, os.cpu_count() or 1)
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys that may change between the interrupted run and its continuation (see changed_keys).
SAFE_TO_CHANGE = frozenset(
    {
        "output_dir",
        "train.max_steps",
        "train.epochs",
        "train.resume",
        "train.resume_trusted",
        "train.max_time",
        "train.micro_batch_size",  # memory and speed only (trainer/global_batch.py)
        "train.on_nonfinite",
        "train.max_nonfinite_in_a_row",
        "train.collective_timeout",
        "log.every_steps",
        "log.trackers",
        "log.tracker_options",
        "log.project",
        "eval.every_steps",
        "eval.batch_size",
        "eval.generate",
        "eval.max_new_tokens",
        "eval.early_stopping_patience",
        "eval.early_stopping_min_delta",
        "eval.early_stopping_min_share",
        "checkpoint.every_steps",
        "checkpoint.every_minutes",
        "checkpoint.keep_last",
        "checkpoint.at_epoch_end",
    }
)
# Of those, safe only while the learning-rate schedule does not depend on them.
SCHEDULE_LENGTH = ("train.max_steps", "train.epochs")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` lives."""
    return run_dir / CHECKPOINTS / f"step-{step:08d}"


def _sha256(path: Path, start: int = 0, length: int | None = None) -> str:
    """SHA-256 of `length` bytes of `path` from `start` (None: to the end)."""
    digest = hashlib.sha256()
    left = math.inf if length is None else length
    with path.open("rb") as handle:
        handle.seek(start)
        while left > 0 and (block := handle.read(int(min(1 << 20, left)))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _piece_digests(paths: list[Path]) -> list[list[str]]:
    """Each file's SHA-256 per HASH_PIECE bytes, every piece of every file hashed side by
    side (hashlib releases the GIL): one SHA-256 of a whole multi-GB file would take one
    core for as long as a save of it, while its pieces spread over the node's cores. A file
    linked twice (a checkpoint's weights, also in its model/) is hashed once."""
    first: dict[tuple[int, int], int] = {}  # (device, inode) -> index of its first path
    owner = [first.setdefault((p.stat().st_dev, p.stat().st_ino), i) for i, p in enumerate(paths)]
    pieces = [
        (index, path, start)
        for index, path in enumerate(paths)
        if owner[index] == index
        for start in range(0, max(path.stat().st_size, 1), HASH_PIECE)
    ]
    with ThreadPoolExecutor(min(HASH_THREADS, len(pieces) or 1)) as pool:
        hashed = pool.map(lambda piece: _sha256(piece[1], piece[2], HASH_PIECE), pieces)
        digests: list[list[str]] = [[] for _ in paths]
        for (index, _, _), digest in zip(pieces, hashed, strict=True):
            digests[index].append(digest)
    return [digests[index] for index in owner]


def own_files(folder: Path) -> list[Path]:
    """The files under `folder` that its writer wrote, sorted: not the links an adapter's
    base/ holds to the original base's weights (trainer/model/labelled_base.py), which
    belong to that base and would cost a hash of the whole base at every save."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def sync_tree(folder: Path) -> None:
    """Flush every file under `folder` and then its directories to disk: a commit marker or
    rename is durable only once the data it vouches for is. The weight files get the
    umask's mode first (trainer.security.umask_modes)."""
    umask_modes(folder)
    for path in own_files(folder):
        try:
            handle = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # renamed by the process that writes it: that one flushes it
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        atomic.sync_directory(path)
    atomic.sync_directory(folder)


def write_commit(folder: Path) -> None:
    """Write the manifest of every file in `folder`, atomically and durably, as its last
    file (the files themselves are synced before: `sync_tree`)."""
    files = [p for p in own_files(folder) if p.name != COMMIT_NAME]
    manifest = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": digests}
        for p, digests in zip(files, _piece_digests(files), strict=True)
    }
    atomic.write_json(folder / COMMIT_NAME, {"files": manifest})


def problem_with(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (None when its files match the manifest). Sizes
    first: a truncated or missing file, what a kill or a full disk leaves, costs no hashing."""
    marker = folder / COMMIT_NAME
    if not marker.is_file():
        return "incomplete (no commit marker)"
    try:
        manifest = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "its commit marker is damaged"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['size']}"
    names = [name for name, entry in manifest.items() if isinstance(entry["sha256"], list)]
    pieces = dict(zip(names, _piece_digests([folder / name for name in names]), strict=True))
    for name, expected in manifest.items():
        # a whole-file digest: a checkpoint from before the pieces
        found = pieces.get(name) or _sha256(folder / name)
        if found != expected["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders by step, newest first (complete or not)."""
    found = []
    for path in (run_dir / CHECKPOINTS).glob("step-*"):
        match = _STEP_DIR.match(path.name.removesuffix(".partial"))
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def select_checkpoint(run_dir: Path, resume: str, report: Callable[[str], None]) -> Path | None:
    """The checkpoint to continue from: `auto` the newest valid one in the run, `never`
    none, otherwise the given folder, which must be valid."""
    if resume == "never":
        return None
    if resume != "auto":
        folder = Path(resume).expanduser()
        problem = problem_with(folder) if folder.is_dir() else "not found"
        if problem:
            raise UserError(f"train.resume: checkpoint {resume}: {problem}")
        return folder
    for _, folder in step_folders(run_dir):
        problem = problem_with(folder)
        if problem is None:
            return folder
        report(f"skipping checkpoint {folder}: {problem}")
    return None


def rotate(run_dir: Path, keep_last: int, keep: set[Path]) -> list[Path]:
    """Paths of checkpoints beyond the newest `keep_last` complete ones, except `keep`
    (the best one); called only after a new checkpoint is complete and durable (its files
    and its rename synced), so that only what is older than it goes.

    A fault checkpoint (saved at a stop for non-finite values) does not count toward
    `keep_last`: restarts that meet the NaN again, each saving at its stop, would otherwise
    push the last good checkpoints out. Only the newest fault checkpoint is kept, and only
    while no good one is newer."""
    if not keep_last:
        return []
    complete = [(s, f) for s, f in step_folders(run_dir) if (f / COMMIT_NAME).is_file()]
    good = [(s, f) for s, f in complete if not is_fault_checkpoint(f)]
    faults = [(s, f) for s, f in complete if is_fault_checkpoint(f)]
    newest_good = good[0][0] if good else -1
    drop = [f for _, f in good[keep_last:]]
    drop += [f for i, (s, f) in enumerate(faults) if i > 0 or s < newest_good]
    return [f for f in drop if f.resolve() not in keep]


def loop_state_file(folder: Path) -> Path | None:
    """The loop state file of checkpoint `folder` (the old name in a checkpoint saved before
    the rename); None when `folder` has neither, i.e. is no checkpoint."""
    for name in (LOOP_STATE_NAME, OLD_STATE_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def read_loop_state(folder: Path) -> dict:
    """The loop state checkpoint `folder` was saved with."""
    path = loop_state_file(folder)
    if path is None:
        raise FileNotFoundError(folder / LOOP_STATE_NAME)
    return json.loads(path.read_text())


def is_fault_checkpoint(folder: Path) -> bool:
    """Whether `folder` was saved at a stop for non-finite values (its state says so)."""
    try:
        return bool(read_loop_state(folder).get("fault"))
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: counted as a good one, so that it is never the one kept


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in (
            "config_overrides",
            "options",
            "tracker_options",
        ):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Config keys whose values differ and that are not safe to change on resume. A key
    the saved config lacks (a run saved before the key existed) is unchanged while it
    keeps its default, which does what that version did."""
    from trainer.config import RunConfig, to_dict

    old, new = _flatten(saved), _flatten(current)
    defaults = _flatten(to_dict(RunConfig()))
    unsafe = (
        key
        for key in old.keys() | new.keys()
        if key not in SAFE_TO_CHANGE
        and old.get(key, defaults.get(key)) != new.get(key, defaults.get(key))
    )
    return sorted([*unsafe, *_schedule_length_keys(old, new)])


def _schedule_length_keys(old: dict, new: dict) -> list[str]:
    """`train.max_steps` / `train.epochs` when their change would make the learning rate
    jump: they set the total steps, over which the warmup ratio and a linear or cosine
    decay are stretched (run/optim.py), and the scheduler is rebuilt at every start. A
    constant schedule without warmup does not depend on them; `epochs` does not count
    while `max_steps` is set."""
    if new.get("train.scheduler") == "constant" and not new.get("train.warmup_ratio"):
        return []

    def length(flat: dict) -> tuple:
        steps = flat.get("train.max_steps")
        return steps, None if steps else flat.get("train.epochs")

    if length(old) == length(new):
        return []
    return [key for key in SCHEDULE_LENGTH if old.get(key) != new.get(key)]


def config_change_problem(saved: dict, current: dict, checkpoint: str) -> str | None:
    """The one line that refuses a resume under a changed run config (None: unchanged
    where it matters), each key with its saved and new value."""
    keys = changed_keys(saved, current)
    if not keys:
        return None
    old, new = _flatten(saved), _flatten(current)
    changes = ", ".join(f"{key} (saved {old.get(key)!r}, now {new.get(key)!r})" for key in keys)
    why = ""
    if any(key in SCHEDULE_LENGTH for key in keys):
        why = " (the learning-rate schedule is stretched over the steps they set)"
    return (
        f"train.resume: the run config differs from checkpoint {checkpoint} in {changes}; "
        f"restore them or use another output_dir{why}"
    )


# Keys that say where and how to start, not what is trained.
HOW_TO_START = frozenset({"output_dir", "train.resume", "train.resume_trusted"})


def finished_run_problem(saved: dict, current: dict, run_dir: Path) -> str | None:
    """The one line that refuses to call a run finished when the config asks for something
    else (more epochs, another learning rate): every key with its value then and now."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(
        k for k in old.keys() | new.keys() if k not in HOW_TO_START and old.get(k) != new.get(k)
    )
    if not keys:
        return None
    changes = ", ".join(f"{key} (then {old.get(key)!r}, now {new.get(key)!r})" for key in keys)
    return (
        f"output_dir: {run_dir} holds a finished run trained with other values: {changes}; "
        "use another output_dir, or train.resume=never to train again (the finished run's "
        "files are kept aside)"
    )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records logged after the checkpoint, so the resumed log has no duplicates,
    and a torn last line that a kill during an append left (run/records.py). Written whole
    or not at all: a full disk stops the run (TrainingFailed) with the file untouched."""
    if not path.exists():
        return
    kept = [record for record in read_records(path) if record["step"] <= step]
    with atomic.stop_on_failed_write(path):
        atomic.write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
