"""The run directory's two guards, taken before the run decides to resume or start fresh.

One run at a time: the main process holds a lock on RUN_DIR/.trainer.lock for the whole
run, so that a second run into the same output_dir is refused while the first lives.

One directory for all: every process writes a marker into RUN_DIR and the main process
checks that it sees them all. With a node-local output_dir (each node its own /scratch)
node 0 would otherwise resume from its checkpoint while node 1 starts fresh, and the ranks
train different models until a collective hangs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from trainer import atomic
from trainer.errors import UserError

LOCK_NAME = ".trainer.lock"  # the file flock() locks; empty
OWNER_NAME = ".trainer.lock.json"  # who holds the lock: pid and host, for the message
MARKERS_NAME = ".trainer.ranks"  # RUN_DIR/.trainer.ranks/TOKEN/RANK, one per process
MARKER_WAIT_S = 15.0  # how long the main process looks for the markers (NFS caches lookups)


@dataclass
class RunLock:
    """The lock on one run directory, held through an open file descriptor: the kernel
    releases a flock() when its process dies, so a dead run's lock is simply free."""

    run_dir: Path
    fd: int
    created: bool  # the directory did not exist before this run

    def release(self) -> None:
        """Unlock and remove the lock files (and the directory if this run created it and
        wrote nothing into it): a refused or finished run leaves the directory as it was.
        Idempotent."""
        global _held
        if self.fd < 0:
            return
        (self.run_dir / OWNER_NAME).unlink(missing_ok=True)
        (self.run_dir / LOCK_NAME).unlink(missing_ok=True)  # take_lock checks the inode
        if self.created and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()
        os.close(self.fd)
        self.fd = -1
        if _held is self:
            _held = None


_held: RunLock | None = None  # this process's lock: one process trains one run at a time


def release_run_dir() -> None:
    """Release this process's run-directory lock, if it holds one (the run has ended)."""
    if _held is not None:
        _held.release()


def _owner(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / OWNER_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _alive(owner: dict) -> bool:
    """Whether the owner may still run: on this host, its pid exists; on another host we
    cannot tell, so it counts as alive."""
    if not owner:
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _in_use(run_dir: Path, owner: dict) -> str:
    who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
    return (
        f"output_dir: {run_dir} is in use by another run ({who}); wait for it to end or use "
        f"another output_dir (if that run is dead, delete {run_dir / OWNER_NAME})"
    )


def take_lock(run_dir: Path) -> RunLock:
    """Lock `run_dir` for this process, or raise UserError naming the run that holds it.

    flock() works on local filesystems and, on Linux, over NFS (emulated with POSIX locks,
    released by the server when a dead client's lease ends). Where a mount refuses it
    (ENOLCK, EOPNOTSUPP: some Lustre or old NFS mounts) the owner file decides alone: a
    dead pid on this host is taken over, an owner on another host is not."""
    global _held
    if _held is not None:  # the run before, in this process (tests, notebooks), has ended
        _held.release()
    created = not run_dir.exists()
    while True:
        fd = _open_lock_file(run_dir)
        _flock(fd, run_dir)
        if _same_file(fd, run_dir / LOCK_NAME):
            break
        os.close(fd)  # a run released (and unlinked) it between our open and flock: again
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    atomic.write_text(run_dir / OWNER_NAME, json.dumps(owner))
    _held = RunLock(run_dir, fd, created)
    return _held


def _open_lock_file(run_dir: Path) -> int:
    """The lock file's descriptor, the run directory created first if need be; a directory
    that can't be written (read-only, not permitted, under /proc) is the user's to fix."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"output_dir: can't write to {run_dir}: {err.strerror}") from None


def _flock(fd: int, run_dir: Path) -> None:
    """flock `fd` without waiting, or close it and raise UserError naming the holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(_in_use(run_dir, _owner(run_dir))) from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        if _alive(owner := _owner(run_dir)):
            os.close(fd)
            raise UserError(_in_use(run_dir, owner)) from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _missing_markers(folder: Path, ranks: int) -> list[int]:
    """Ranks whose marker the main process does not see, after waiting a little: another
    node's new file may take a few seconds to appear through NFS attribute caches."""
    deadline = time.monotonic() + MARKER_WAIT_S
    while True:
        missing = [rank for rank in range(ranks) if not (folder / str(rank)).is_file()]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.5)


def claim_run_dir(accelerator: Accelerator, run_dir: Path) -> None:
    """Lock the run directory (main process) and check that every process writes into the
    same one; raise the same UserError on every process otherwise."""
    problem = None
    if accelerator.is_main_process:
        try:
            take_lock(run_dir)
        except UserError as err:
            problem = str(err)
    if accelerator.num_processes == 1:
        if problem:
            raise UserError(problem)
        return
    shared = [problem, uuid.uuid4().hex]  # the main process's token names this launch
    broadcast_object_list(shared)
    problem, token = shared
    if problem is None:
        problem = _check_markers(accelerator, run_dir / MARKERS_NAME / token)
    if problem:
        raise UserError(problem)


def _check_markers(accelerator: Accelerator, folder: Path) -> str | None:
    """Every process writes folder/RANK; the main one counts them (None: all there)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(folder / str(accelerator.process_index), socket.gethostname())
    hosts = gather_object([socket.gethostname()])
    verdict = [None]
    if accelerator.is_main_process:
        missing = _missing_markers(folder, accelerator.num_processes)
        if missing:
            unseen = ", ".join(f"rank {rank} on {hosts[rank]}" for rank in missing)
            verdict = [
                f"output_dir: {folder.parents[1]} is not one directory for all processes: "
                f"the main process on {hosts[0]} does not see the files of {unseen}; "
                "output_dir must be on a filesystem all nodes share"
            ]
    broadcast_object_list(verdict)
    _remove_marker(folder, accelerator.process_index)
    return verdict[0]


def _remove_marker(folder: Path, rank: int) -> None:
    """Each process removes its own marker; the last one out removes the folders."""
    (folder / str(rank)).unlink(missing_ok=True)
    for empty in (folder, folder.parent):
        try:
            empty.rmdir()
        except OSError:  # another process's marker is still there
            return
