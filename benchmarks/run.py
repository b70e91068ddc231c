"""`make bench`: every benchmark section in one run, one results file per machine.

Runs the sections one after the other on this machine and writes
`benchmarks/results/<date>-<machine>.md` (for reading) and `.json` (every number, the
machine and the versions), rewritten after each section so that a failure or an interrupt
keeps what was measured before it. A section that fails is reported in the file and by the
exit code; the others still run.

Sections (each a script of its own too; see benchmarks/README.md):

1. ``throughput``: our engine vs plain `transformers.Trainer` (+ peft for LoRA) on MLM, CLM,
   sentiment and sentiment with LoRA (compare_hf_trainer.py).
2. ``inference``: `trainer predict` vs a per-sample loop padded to 128 (inference.py).
3. ``peft``: full fine-tuning vs LoRA vs QLoRA: step time, peak memory, trainable share
   (peft_methods.py).
4. ``scaling``: 1 vs 2 processes, sequence length and model size (scaling.py).
5. ``hardware``: MFU against the measured (CPU) or published (GPU) peak, ours vs a minimal
   hand-written loop (hardware.py).
6. ``optimisations``: each optimisation of the step on and off (optimisations.py).

How to run
----------
    make bench                                   # everything, ~25 minutes on 2 idle cores
    make bench BENCH_ARGS=--quick                # short runs of everything, ~8 minutes
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/run.py --only throughput,inference

Timings need an otherwise idle machine: each section records the load average.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the section modules

from _common import RESULTS_DIR, ROOT, fmt, in_work_dir, machine_info, machine_slug

# name: (module, its run(quick, work_dir) -> dict, its Markdown of that dict -> lines)
SECTIONS: dict[str, tuple[str, str, str]] = {
    "throughput": ("compare_hf_trainer", "run", "markdown"),
    "inference": ("inference", "run", "markdown"),
    "peft": ("peft_methods", "run", "section"),
    "scaling": ("scaling", "run", "markdown"),
    "hardware": ("hardware", "run", "markdown"),
    "optimisations": ("optimisations", "run", "markdown"),
}
THROUGHPUT_GOAL = 1.3  # ours / Trainer, useful tokens/s, every row (on CPU)
INFERENCE_GOAL = 20.0  # trainer predict / naive loop
GPT2_MFU_GOAL = 0.45  # GPT-2-124M at sequence length 1024, bf16, one H100


def section_functions(name: str) -> tuple[Callable[..., dict], Callable[[dict], list[str]]]:
    """A section's run and Markdown functions (imported only when the section runs)."""
    module_name, run_name, markdown_name = SECTIONS[name]
    module = importlib.import_module(module_name)
    return getattr(module, run_name), getattr(module, markdown_name)


def run_section(name: str, quick: bool, work_dir: Path) -> dict[str, Any]:
    """One section, timed, with the load average around it; a failure becomes a record."""
    run, _ = section_functions(name)
    folder = work_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    record: dict[str, Any] = {"load_before": load_before}
    try:
        record["result"] = run(quick, folder)
    except Exception as error:  # reported in the results; the other sections go on
        traceback.print_exc()
        record["error"] = f"{type(error).__name__}: {error}"
    os.chdir(ROOT)  # a section may have moved elsewhere
    record["seconds"] = time.perf_counter() - start
    record["load_after"] = os.getloadavg()[0]
    return record


# --- the results file ----------------------------------------------------------------------


def goals(sections: dict[str, dict]) -> list[str]:
    """The issue's goals next to what this run measured."""
    lines = ["| goal | measured | met |", "|---|---|---|"]

    def add(goal: str, value: float | None, target: float, shown: str) -> None:
        met = "n/a" if value is None else ("yes" if value >= target else "no")
        lines.append(f"| {goal} | {shown} | {met} |")

    jobs = sections.get("throughput", {}).get("result", {}).get("jobs", [])
    for job in jobs:
        value = job["ratio_ours_over_hf"]["tokens_per_s"]
        add(
            f"throughput {job['job']['name']}: ours / Trainer ≥ {THROUGHPUT_GOAL}×",
            value,
            THROUGHPUT_GOAL,
            f"{fmt(value, 2)}×",
        )
    ways = sections.get("inference", {}).get("result", {}).get("ways", [])
    ours = [w["speedup_vs_naive"] for w in ways if w["way"].startswith("ours (")]
    speedup = max(ours) if ours else None
    add(
        f"trainer predict / naive loop ≥ {INFERENCE_GOAL:g}×",
        speedup,
        INFERENCE_GOAL,
        f"{fmt(speedup, 1)}×",
    )
    gpu = sections.get("hardware", {}).get("result", {}).get("gpu", {})
    mfu = gpu["jobs"]["clm"]["ours"]["mfu"] if "jobs" in gpu else None
    add(
        f"GPT-2-124M, seq 1024, bf16 MFU on the GPU ≥ {GPT2_MFU_GOAL:.0%}",
        mfu,
        GPT2_MFU_GOAL,
        "not run: no GPU" if mfu is None else f"{mfu:.1%}",
    )
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The whole results file: machine, goals, then each section's own Markdown."""
    m = report["machine"]
    lines = [
        f"# Benchmarks: {report['slug']} ({m['date']})",
        "",
        "Generated by `make bench`" + (" with `--quick`" if report["quick"] else "") + ".",
        "",
        f"- CPU: {m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads), "
        f"bf16 {m.get('cpu_bf16', 'not recorded')}; GPU: {m['gpu'] or 'none'}",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"accelerate {m['accelerate']}, datasets {m['datasets']}, peft {m.get('peft')}, "
        f"bitsandbytes {m.get('bitsandbytes')}",
        "- Sections (seconds, 1-minute load average before → after): "
        + ", ".join(
            f"{name} ({s['seconds']:.0f} s, {s['load_before']:.1f} → {s['load_after']:.1f})"
            for name, s in report["sections"].items()
        ),
        "",
        "## Goals",
        "",
        *goals(report["sections"]),
    ]
    for index, (name, record) in enumerate(report["sections"].items(), start=1):
        if "error" in record:
            lines += ["", f"## {index}. {name}: failed", "", f"`{record['error']}`"]
            continue
        _, section_markdown = section_functions(name)
        body = section_markdown(record["result"])
        lines += ["", f"## {index}. {body[0].lstrip('# ')}", *body[1:]]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any]) -> Path:
    """results/<date>-<machine>.{json,md}; returns the .md path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"{report['machine']['date']}-{report['slug']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    return stem.with_suffix(".md")


# --- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--quick, --only, --work-dir."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs of every section")
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--work-dir", type=Path, help="keep run folders here (default: tmp)")
    args = parser.parse_args(argv)
    args.sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(
            f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the sections, rewriting the results after each; exit 1 if one failed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.chdir(ROOT)  # data paths are relative to the repository root
    args = parse_args(argv)
    info = machine_info(extra_packages=("peft", "bitsandbytes", "deepspeed"))
    report: dict[str, Any] = {
        "machine": info,
        "slug": machine_slug(info),
        "quick": args.quick,
        "sections": {},
    }

    def run_all(work_dir: Path) -> None:
        for name in args.sections:
            print(f"=== {name} ===", flush=True)
            report["sections"][name] = run_section(name, args.quick, work_dir)
            print(f"=== {name}: wrote {write(report)}", flush=True)

    in_work_dir(args.work_dir, "bench-", run_all)
    failed = [name for name, s in report["sections"].items() if "error" in s]
    if failed:
        print(f"error: section(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
