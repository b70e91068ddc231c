"""What every section shares: the machine, running a command in a fresh process (wall time,
load averages, its own peak RSS), the worker entry point's caller, and number formatting."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("transformers", "accelerate", "datasets", "peft", "bitsandbytes", "deepspeed")


# --- the machine ---------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's answer elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_bf16() -> str:
    """Whether this CPU computes bf16 matrix products in hardware (torch's own checks):
    bf16 autocast is many times slower than fp32 where it is emulated, faster where not."""
    import torch

    checks = (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
    native = [name for name, check in checks if getattr(torch.cpu, check, lambda: False)()]
    return f"native ({', '.join(native)})" if native else "emulated (no AVX512-BF16 or AMX)"


def machine_info() -> dict[str, Any]:
    """CPU, GPU, library versions and date: the results header, and what a later run is
    compared against."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_bf16": cpu_bf16(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,  # with its build tag (+cpu, +cu128)
    }
    for name in PACKAGES:
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    return info


def machine_slug(info: dict[str, Any]) -> str:
    """A file-name-safe name of the machine: its GPU, or its CPU model and core count."""
    name = info["gpu"] or f"{info['cpu']} {info['cpu_cores']}cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- a command in a fresh process ----------------------------------------------------------


@dataclass
class Measured:
    """What running one command cost."""

    wall_s: float
    load_before: float  # 1-minute load average just before the command started
    load_after: float  # ... and just after it ended
    peak_rss_mb: float  # peak resident memory of the command's own process
    returncode: int


# Runs between this process and the measured command, so that the command's peak RSS is its
# own: Linux copies a parent's RSS high-water mark into the child at fork and keeps it across
# exec, so a command started straight from a process that once held a model would report at
# least that process's peak. This reaper is a bare interpreter (~10 MB): it forks the
# command, waits for it, writes its ru_maxrss (KiB) to argv[1] and exits with its status.
_REAPER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as error:
        print(f"{sys.argv[2]}: {error}", file=sys.stderr, flush=True)
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(command: Sequence[str], log_path: Path, check: bool = True) -> Measured:
    """Run a command from the repository root, output to `log_path`, and measure it. Its
    peak RSS is read with wait4 on that one process by a reaper (see `_REAPER`), so neither
    earlier runs nor this process leak into it (RUSAGE_CHILDREN would report the maximum
    over every child so far); the reaper's start (some 20 ms) is in the wall time. With
    `check`, a failure raises with the log's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rss_file = log_path.with_name(log_path.name + ".maxrss")
    reaper = [sys.executable, "-I", "-S", "-c", _REAPER, str(rss_file)]
    load_before, start = os.getloadavg()[0], time.perf_counter()
    with log_path.open("w") as log:
        code = subprocess.run(
            [*reaper, *command], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    wall_s = time.perf_counter() - start
    rss_kib = int(rss_file.read_text()) if rss_file.is_file() else 0
    rss_file.unlink(missing_ok=True)
    if check and code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"{command[0]} failed ({code}):\n{tail}")
    return Measured(wall_s, load_before, os.getloadavg()[0], rss_kib / 1024, code)


def run_worker(
    name: str, spec: dict, log_path: Path, env: Sequence[str] = (), check: bool = True
) -> tuple[Measured, dict]:
    """`python -m benchmarks.worker NAME` (see benchmarks/worker.py) in a fresh process,
    measured; returns the measure and the JSON the worker wrote (empty if it wrote none).
    `env`: VAR=value settings for that process (e.g. OMP_NUM_THREADS=1)."""
    out = log_path.with_suffix(".out.json")
    out.unlink(missing_ok=True)
    command = ["env", *env] if env else []
    command += [sys.executable, "-m", "benchmarks.worker", name, json.dumps(spec), str(out)]
    measured = run_measured(command, log_path, check)
    return measured, json.loads(out.read_text()) if out.is_file() else {}


def read_jsonl(path: Path) -> list[dict]:
    """All records of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def folder_size(path: Path) -> int:
    """Bytes of all files under a folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def steady_throughput(windows: list[dict]) -> dict[str, Any]:
    """Tokens/s and step time over every log window but the first (warm-up: kernel
    selection, allocator, first-touch of the optimizer state). A window is a record with
    step, elapsed_s and tokens: a training record of our engine's metrics.jsonl, or one the
    hand-written loop writes the same way."""
    if len(windows) < 2:
        raise RuntimeError("need at least two log windows (the first is warm-up)")
    seconds = windows[-1]["elapsed_s"] - windows[0]["elapsed_s"]
    steps = windows[-1]["step"] - windows[0]["step"]
    tokens = sum(w["tokens"] for w in windows[1:])
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / steps,
        "timed_steps": steps,
        "timed_s": seconds,
        "timed_tokens": tokens,
    }


# --- numbers and tables --------------------------------------------------------------------


def ratio(ours: float | None, other: float | None) -> float | None:
    """ours / other, or None when undefined."""
    return ours / other if ours is not None and other else None


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for the tables ('n/a' for None)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table: columns of numbers (every cell a number, n/a or empty) are
    right-aligned, the others left-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    numeric = [all(re.match(r"-?\d|n/a$|$", row[i]) for row in cells) for i in range(len(head))]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "".join("---:|" if n else "---|" for n in numeric),
    ]
    return lines + ["| " + " | ".join(row) + " |" for row in cells]


Column = tuple[str, Callable[[Any], Any]]


def column_table(columns: Sequence[Column], items: Iterable[Any]) -> list[str]:
    """A Markdown table with a row per item: each column a heading and its cell of an item."""
    rows = [[cell(item) for _, cell in columns] for item in items]
    return table([heading for heading, _ in columns], rows)


def load_warning(loads: list[float]) -> list[str]:
    """A warning when the 1-minute load averages around the runs show other processes on
    the CPU. The average also counts this benchmark's own previous run (a run on every core
    leaves about 0.6 x cores a minute later), so only an average above the core count is
    taken as other load."""
    cores = os.cpu_count() or 1
    if not loads or max(loads) <= cores:
        return []
    return [
        "",
        f"**Warning: the machine was busy** (1-minute load average up to {max(loads):.1f} on "
        f"{cores} cores around a run, more than this benchmark alone puts there): the times "
        "include other processes' share of the CPU.",
    ]
