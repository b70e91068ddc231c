"""A full disk anywhere in a save stops the run with exit 3 and one line, leaves nothing
half written, and loses nothing already committed: the next start, with room again,
resumes from the previous checkpoint.

The disk fills for real, through the kernel: RLIMIT_FSIZE (the file size limit of
`ulimit -f`, with SIGXFSZ ignored so that a write past it fails with EFBIG) is set in this
process for the one run that should fail. safetensors then raises SafetensorError and
torch.save a RuntimeError, neither an OSError, as they do on ENOSPC."""

from __future__ import annotations

import contextlib
import errno
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_metrics
from interrupted_runs import cli, comparable, saved_steps, stop_in_process
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainer.atomic import write_failure
from trainer.run.resume import checkpoint_dir, problem_with
from trainer.run.stop import EXIT_PREEMPTED

MODEL_BYTES = 127_512  # model.safetensors of the tiny BERT; optimizer.bin is 280_587


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes of any file fail with EFBIG, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def leftovers(run_dir: Path) -> list[Path]:
    """Half-written things: `.partial` checkpoints, `.tmp` folders and files."""
    return [p for p in run_dir.rglob("*") if p.name.endswith((".partial", ".tmp"))]


SECTIONS = {
    "train": {"max_steps": 15},
    "eval": {"every_steps": 5, "batch_size": 16},
    "checkpoint": {"every_steps": 5, "keep_last": 2, "at_epoch_end": False},
}


@pytest.fixture
def stopped_at_10(run_config, tmp_path):
    """An MLM run with validation, evaluated and checkpointed every 5 steps, stopped by
    SIGTERM at step 10 (checkpoints 5 and 10, best/ at an evaluation)."""
    config = run_config("mlm", **SECTIONS)
    assert stop_in_process(config, 10) == EXIT_PREEMPTED
    return config, tmp_path / "run"


# what fills the disk, and the file whose write fails first
CASES = {
    "checkpoint model (safetensors)": (lambda metrics: 50_000, "best"),
    "checkpoint optimizer (torch.save)": (lambda metrics: 200_000, "checkpoint"),
    "metrics append": (lambda metrics: metrics + 50, "metrics.jsonl"),
    "metrics truncation at resume": (lambda metrics: metrics - 100, "metrics.jsonl"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_full_disk_stops_with_exit_3_and_the_previous_checkpoint_resumes(
    stopped_at_10, run_config, capsys, case
):
    config, run_dir = stopped_at_10
    limit_of, failing = CASES[case]
    metrics = (run_dir / "metrics.jsonl").stat().st_size
    assert (run_dir / "config.yaml").stat().st_size < metrics - 100  # fails first otherwise
    best = (run_dir / "best" / "model.safetensors").read_bytes()
    before = read_metrics(run_dir)
    capsys.readouterr()

    with file_size_limit(limit_of(metrics)):
        assert cli("train", config) == 3
    err = capsys.readouterr().err
    # the progress bar leaves its line open: the error starts on it
    lines = [line[line.index("error:") :] for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and err.count("error:") == 1 and "Traceback" not in err, err
    assert lines[0].endswith("; the previous checkpoint is intact")
    where = {
        "best": f"could not write {run_dir / 'best'}: File too large",
        "checkpoint": f"could not write checkpoint {checkpoint_dir(run_dir, 15)}: ",
        "metrics.jsonl": f"could not write {run_dir / 'metrics.jsonl'}: File too large",
    }[failing]
    assert where in lines[0], lines[0]
    assert leftovers(run_dir) == []
    assert saved_steps(run_dir) == [5, 10]
    assert problem_with(checkpoint_dir(run_dir, 10)) is None
    if failing == "best":
        assert (run_dir / "best" / "model.safetensors").read_bytes() == best
    load_file(run_dir / "best" / "model.safetensors")
    assert read_metrics(run_dir)[: len(before)] == before  # whole records only, none lost

    assert cli("train", config) == 0  # room again
    assert f"resuming from {checkpoint_dir(run_dir, 10)} (step 10)" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 16))
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_an_uninterrupted_run_logs_what_the_resumed_one_logs(stopped_at_10, run_config, tmp_path):
    """The resume after a full disk continues the same run (a reference for the above)."""
    config, run_dir = stopped_at_10
    with file_size_limit(50_000):
        assert cli("train", config) == 3
    assert cli("train", config) == 0
    reference = run_config("mlm", output_dir=str(tmp_path / "ref"), **SECTIONS)
    assert cli("train", reference) == 0
    assert comparable(run_dir) == comparable(tmp_path / "ref")


def test_write_failures_are_named_narrowly(tmp_path):
    """The texts safetensors and torch raise on a full disk map to it; other errors of the
    same types are bugs and keep their tracebacks."""
    rust = SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )
    assert write_failure(rust, tmp_path) == "No space left on device"
    legacy = RuntimeError("write(): fd 3 failed with File too large")
    assert write_failure(legacy, tmp_path) == "File too large"
    assert write_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    zip_writer = RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
    )
    assert write_failure(zip_writer, tmp_path) in (
        "No space left on device",
        "torch.save could not write",
    )
    assert write_failure(RuntimeError("CUDA out of memory"), tmp_path) is None
    assert write_failure(SafetensorError("invalid header"), tmp_path) is None
    assert write_failure(ValueError("No space left on device"), tmp_path) is None
