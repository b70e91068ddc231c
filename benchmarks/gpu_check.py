"""`make gpu-check`: what only a GPU shows, in one run of at most 8 minutes on one GPU, as
one table, printed and written to benchmarks/results/<date>-gpu-check.{md,json}.

    python -m benchmarks.gpu_check [--budget-s 480] [--work-dir DIR] [--no-write]

The checks, in order, each bounded by what is left of the budget:
- the machine: torch, CUDA, the GPU, and which of our packages are missing;
- every `gpu`-marked test (`pytest -m gpu`), a row per test: the one-process ZeRO-2, ZeRO-3
  and FSDP2 runs that match a plain run, QLoRA on CUDA, the fp16 skip of a NaN step, ...;
- bf16 training of a GPT-2-124M-shaped model built from config: our engine and a
  hand-written PyTorch loop back to back, tokens/s and MFU against this GPU's measured bf16
  matmul peak (benchmarks/hardware.py's GPU job);
- `trainer predict` throughput on the GPU, fp32 and bf16.

A lent GPU machine may lack some of our packages and reach no package index: `make
gpu-wheels`, run beforehand where PyPI is reachable, puts them as wheels into .whl/, which
this check installs into a folder of its own first. Whatever cannot run is a `skipped` row
that says why; a check that breaks is a `failed` row with its last error line, and the exit
code is 1. Nothing is skipped silently.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from benchmarks.common import ROOT, table

RESULTS_DIR = ROOT / "benchmarks" / "results"
WHEELS = ROOT / ".whl"
SITE_ENV = "GPU_CHECK_SITE"  # set once the carried wheels are installed (no second install)
NEEDED = ("torch", "transformers", "accelerate", "peft", "datasets", "deepspeed", "bitsandbytes")
NEEDED += ("safetensors", "tokenizers", "pyyaml", "tqdm", "pytest")
PREDICT_TEXTS = 4096
PREDICT_BATCH = 64


@dataclass
class Row:
    """One line of the table."""

    check: str
    status: str  # passed | failed | skipped
    detail: str = ""


@dataclass
class Budget:
    """The seconds the whole check may take; each part gets what is left."""

    seconds: float
    start: float = 0.0

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


# --- the carried wheels ---------------------------------------------------------------------


def install_carried_wheels() -> None:
    """Install .whl/*.whl into a folder of their own and restart this process with it on
    PYTHONPATH (once; `make gpu-wheels` made them). Only where some package is missing."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if os.environ.get(SITE_ENV) or not wheels or not missing_packages():
        return
    site = Path(tempfile.gettempdir()) / "gpu-check-site"
    print(f"[gpu-check] installing {len(wheels)} carried wheels into {site} ...", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    pip += ["--no-compile", "--upgrade", "--target", str(site), *map(str, wheels)]
    subprocess.run(pip, check=True)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    os.environ.update({"PYTHONPATH": path, SITE_ENV: str(site)})
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *sys.argv[1:]])


def missing_packages() -> list[str]:
    """Those of our packages that are not installed."""
    missing = []
    for name in NEEDED:
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(name)
    return missing


# --- the checks -----------------------------------------------------------------------------


def machine_rows() -> list[Row]:
    """What runs where: torch and CUDA, the GPU, the package versions, what is missing."""
    import torch

    versions = ", ".join(f"{n} {version(n)}" for n in NEEDED if n not in missing_packages())
    rows = [Row("machine: packages", "passed", versions)]
    if missing := missing_packages():
        rows.append(Row("machine: missing packages", "skipped", ", ".join(missing)))
    if not torch.cuda.is_available():
        return [*rows, Row("machine: CUDA", "skipped", f"torch {torch.__version__}: no CUDA")]
    name = torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    detail = f"{name}, {memory:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return [*rows, Row("machine: CUDA", "passed", detail)]


def gpu_tests(budget: Budget, work_dir: Path) -> list[Row]:
    """`pytest -m gpu`, a row per test from its JUnit XML."""
    report = work_dir / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    command += [f"--junitxml={report}", "tests"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path()}
    timeout = max(budget.left() - 200, 60)  # leave time for the throughput checks
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return [Row("gpu tests", "failed", f"did not finish within {timeout:.0f} s")]
    if not report.is_file():
        return [Row("gpu tests", "failed", last_line(done.stdout + done.stderr))]
    rows = [test_row(case) for case in ET.parse(report).iter("testcase")]
    if not rows:  # exit code 5: nothing collected is a failure, as in CI
        return [Row("gpu tests", "failed", "no test is marked gpu")]
    return rows


def test_row(case: ET.Element) -> Row:
    """A JUnit test case as a row: its outcome and, where not passed, the message."""
    name = f"test {case.get('classname', '').split('.')[-1]}::{case.get('name')}"
    for tag, status in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
        found = case.find(tag)
        if found is not None:
            return Row(name, status, (found.get("message") or "").splitlines()[0][:160])
    return Row(name, "passed", f"{float(case.get('time', 0)):.1f} s")


def mfu_rows(work_dir: Path) -> list[Row]:
    """GPT-2-124M at 1024 tokens, bf16: ours and the hand-written loop, tokens/s and MFU
    against the measured bf16 matmul peak (the published one beside it)."""
    from benchmarks import hardware

    job = replace(hardware.GPU_JOBS[0], steps=hardware.QUICK_STEPS["cuda"])
    result = hardware.run_device((job,), "cuda", quick=False, work_dir=work_dir)
    peak, compared = result["peak"], result["jobs"][job.name]
    measured = peak["measured_bf16_matmul_flops"]
    rows = []
    for side in ("ours", "handwritten"):
        tokens_per_s = compared[side]["tokens_per_s"]
        mfu = tokens_per_s * compared["flops_per_token"] / measured
        published = f"{compared[side]['mfu']:.1%} of {peak['flops'] / 1e12:.0f} {peak['source']}"
        detail = f"{tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} of the measured"
        detail += f" {measured / 1e12:.0f} TFLOP/s ({published})"
        rows.append(Row(f"GPT-2-124M bf16 training: {side}", "passed", detail))
    speed = compared["ratio_ours_over_handwritten"]["tokens_per_s"]
    rows.append(Row("GPT-2-124M bf16 training: ours / hand-written", "passed", f"{speed:.2f}"))
    return rows


def predict_rows(work_dir: Path) -> list[Row]:
    """`Predictor.predict` on the GPU: a MiniLM-shaped classifier (built from config and
    trained a few steps: speed does not depend on the weights) over the shipped reviews
    repeated to PREDICT_TEXTS texts, fp32 then bf16."""
    from benchmarks import engine, inference
    from benchmarks.models import build_bert
    from trainer.commands.predict import load_predictor
    from trainer.inference import PredictOptions

    base = build_bert(work_dir / "models" / "minilm-shaped", 6, 384, 12, 1536)
    settings = {
        "model": {"name_or_path": str(base)},
        "data": {"validation": None, "cache_dir": str(work_dir / "cache")},
        "train": {"max_steps": 10},
        "log": {"trackers": []},
    }
    run = engine.train(work_dir / "classifier", settings, engine.QUICKSTART)
    reviews = inference.read_reviews()
    texts = (reviews * (PREDICT_TEXTS // len(reviews) + 1))[:PREDICT_TEXTS]
    rows = []
    for precision in ("no", "bf16"):
        predictor = load_predictor(str(run.run_dir / "final"), [], precision)
        device = next(predictor.model.parameters()).device
        measured = inference.timed(
            lambda t, p=predictor: p.predict(t, PredictOptions(batch_size=PREDICT_BATCH)), texts
        )
        speed = len(texts) / measured["seconds"]
        name = f"trainer predict ({'fp32' if precision == 'no' else precision})"
        rows.append(Row(name, "passed", f"{speed:,.0f} texts/s on {device}, batch {PREDICT_BATCH}"))
    return rows


def python_path() -> str:
    """This checkout first, then what PYTHONPATH already holds (the carried wheels)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def last_line(text: str) -> str:
    """The last non-empty line of some output (an error's message)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


# --- the run --------------------------------------------------------------------------------


def guarded(name: str, needs: tuple[str, ...], part: Callable[[], list[Row]]) -> list[Row]:
    """A part's rows; skipped (naming what is missing) without CUDA or a package it needs;
    failed (with the error's last line) when it breaks."""
    import torch

    if not torch.cuda.is_available():
        return [Row(name, "skipped", "no CUDA")]
    if lacking := [n for n in needs if n in missing_packages()]:
        return [Row(name, "skipped", f"missing {', '.join(lacking)} (make gpu-wheels)")]
    try:
        return part()
    except Exception as error:  # one part's failure is reported; the others still run
        traceback.print_exc()
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        return [Row(name, "failed", message[:200])]


def run_checks(budget: Budget, work_dir: Path) -> list[Row]:
    """Every part in turn, each with its own folder."""
    rows = machine_rows()
    parts: tuple[tuple[str, tuple[str, ...], Callable[[Path], list[Row]]], ...] = (
        ("gpu tests", ("pytest", "datasets"), partial(gpu_tests, budget)),
        ("GPT-2-124M bf16 training", ("datasets",), mfu_rows),
        ("trainer predict", ("datasets",), predict_rows),
    )
    for name, needs, part in parts:
        if budget.left() < 30:
            rows.append(Row(name, "skipped", "out of time (the budget is spent)"))
            continue
        folder = work_dir / name.split()[0].lower()
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[gpu-check] {name} ({budget.left():.0f} s left) ...", flush=True)
        rows += guarded(name, needs, partial(part, folder))
    return rows


def markdown(rows: list[Row], seconds: float) -> str:
    """The results file: what ran, then the table."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    counts = {s: sum(r.status == s for r in rows) for s in ("passed", "failed", "skipped")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    lines = [f"# GPU check, {datetime.date.today().isoformat()}, {gpu}", ""]
    lines += [f"`make gpu-check` in {seconds:.0f} s: {summary}.", ""]
    lines += table(["check", "result", "detail"], ([r.check, r.status, r.detail] for r in rows))
    return "\n".join(lines) + "\n"


def write_results(text: str, rows: list[Row]) -> Path:
    """<date>-gpu-check.md and .json under benchmarks/results/, each by tmp + rename."""
    stem = RESULTS_DIR / f"{datetime.date.today().isoformat()}-gpu-check"
    records = json.dumps([asdict(r) for r in rows], indent=1)
    for path, content in ((stem.with_suffix(".md"), text), (stem.with_suffix(".json"), records)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, path)
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--budget-s", type=float, default=480.0, help="whole check (default 480)")
    parser.add_argument("--work-dir", type=Path, help="keep runs here (default: a temp folder)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    install_carried_wheels()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    budget = Budget(args.budget_s, time.monotonic())
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        rows = run_checks(budget, (args.work_dir or Path(scratch)).resolve())
    text = markdown(rows, budget.seconds - budget.left())
    print(text)
    if not args.no_write:
        print(f"[gpu-check] written to {write_results(text, rows)}")
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
