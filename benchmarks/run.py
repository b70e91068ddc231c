"""`make bench`: the benchmark sections in one run, one results file per machine.

    python -m benchmarks.run [--quick] [--only SECTION,...] [--work-dir DIR]

Writes benchmarks/results/<date>-<machine>.md (for reading) and .json (every number, the
machine and the versions); with --only, <date>-<machine>-<sections>.{md,json}, so that a
partial run never replaces a whole one. Both are rewritten after each section, so that a
failure or an interrupt keeps what was measured before it; a section that fails is
reported in the file and by exit code 1, and the others still run.

Each section is a module with `run(quick, work_dir) -> dict` (every number, JSON-ready) and
`markdown(result) -> str` (its part of the results file, from a `## ` heading). Timings
need an otherwise idle machine: the load average around each section is recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.common import ROOT, machine_info, machine_slug
from trainer import atomic

RESULTS_DIR = ROOT / "benchmarks" / "results"
# `make bench`'s sections, in order: name -> module
SECTIONS = {
    "throughput": "compare_hf_trainer",
    "inference": "inference",
    "peft": "peft_methods",
    "scaling": "scaling",
    "hardware": "hardware",
    "optimisations": "optimisations",
    "quality": "quality",
    "quality-lm": "quality_lm",
    "small-data": "small_data",
    "sft": "sft",
    "dapt": "dapt",
}
EXTRA = {  # with --only
    **{s: s for s in ("data_pipeline", "augmentation", "qlora_layout", "multitask_adapters")},
    "dpo": "dpo",
    "preference": "preference_rule",
}
THROUGHPUT_GOAL = 1.3  # ours / Trainer, useful tokens/s, every job (on CPU)
INFERENCE_GOAL = 20.0  # trainer predict / naive loop
GPT2_MFU_GOAL = 0.45  # GPT-2-124M at sequence length 1024, bf16, one H100


def section_module(name: str) -> ModuleType:
    """A section's module (imported only when the section runs or is rendered)."""
    return importlib.import_module(f"benchmarks.{(SECTIONS | EXTRA)[name]}")


def seeded(module: ModuleType) -> bool:
    """Whether a section's forms carry seeds, so that `--seeds` can replace them."""
    forms = getattr(module, "FORMS", None)
    return bool(forms) and all(
        "seeds" in {f.name for f in dataclasses.fields(f)} for f in forms.values()
    )


def run_section(
    name: str, quick: bool, work_dir: Path, seeds: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """One section, timed, with the load average around it; a failure (of its run or of
    its Markdown) becomes the record's error. `seeds` replaces its form's seeds."""
    module = section_module(name)
    folder = (work_dir / name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    start = time.perf_counter()
    try:
        if seeds is None:
            record["result"] = module.run(quick, folder)
        else:
            form = dataclasses.replace(module.FORMS[quick], seeds=seeds)
            record["result"] = module.run(quick, folder, form=form)
        module.markdown(record["result"])  # a result its own Markdown cannot show fails too
    except Exception as error:  # reported in the results; the other sections go on
        traceback.print_exc()
        record["error"] = f"{type(error).__name__}: {error}"
    record["seconds"] = time.perf_counter() - start
    record["load_after"] = os.getloadavg()[0]
    return record


# --- the results file ----------------------------------------------------------------------


def goals(sections: dict[str, dict]) -> list[str]:
    """The issue's goals next to what this run measured, for the sections it ran."""
    rows = []

    def add(goal: str, value: float | None, target: float, spec: str) -> None:
        met = "n/a" if value is None else ("yes" if value >= target else "no")
        rows.append(f"| {goal} | {'n/a' if value is None else spec.format(value)} | {met} |")

    for job in sections.get("throughput", {}).get("result", {}).get("jobs", []):
        goal = f"throughput {job['job']['name']}: ours / Trainer ≥ {THROUGHPUT_GOAL}×"
        add(goal, job["ratio_ours_over_hf"]["tokens_per_s"], THROUGHPUT_GOAL, "{:.2f}×")
    if "inference" in sections:
        ways = sections["inference"].get("result", {}).get("ways", [])
        ours = [w["speedup_vs_naive"] for w in ways if w["way"].startswith("ours (")]
        goal = f"trainer predict / naive loop ≥ {INFERENCE_GOAL:g}×"
        add(goal, max(ours, default=None), INFERENCE_GOAL, "{:.1f}×")
        options = [w["speedup_vs_naive"] for w in ways if w["way"].startswith("ours + ")]
        goal = f"trainer predict with its fastest option / naive loop ≥ {INFERENCE_GOAL:g}×"
        add(goal, max(options, default=None), INFERENCE_GOAL, "{:.1f}×")
    if "hardware" in sections:
        gpu = sections["hardware"].get("result", {}).get("gpu", {})
        goal = f"GPT-2-124M, seq 1024, bf16 MFU on the GPU ≥ {GPT2_MFU_GOAL:.0%}"
        if "skipped" in gpu:
            rows.append(f"| {goal} | not run: {gpu['skipped']} | n/a |")
        else:
            add(
                goal,
                gpu.get("jobs", {}).get("clm", {}).get("ours", {}).get("mfu"),
                GPT2_MFU_GOAL,
                "{:.1%}",
            )
    if "sft" in sections and "result" in sections["sft"]:
        from benchmarks import sft

        for goal, value, _ in sft.goals(sections["sft"]["result"]):
            add(goal, value, sft.PACKING_GOAL, "{:.2f}×")
    head = ["", "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    return [*head, *rows] if rows else []


def render(report: dict[str, Any]) -> str:
    """The whole results file: the machine, the goals, then each section's Markdown."""
    m = report["machine"]
    lines = [
        f"# Benchmarks: {report['slug']} ({m['date']})",
        "",
        f"Generated by `{report['command']}`.",
        "",
        f"- CPU: {m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads), "
        f"bf16 {m['cpu_bf16']}; GPU: {m['gpu'] or 'none'}",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"accelerate {m['accelerate']}, datasets {m['datasets']}, peft {m['peft']}, "
        f"bitsandbytes {m['bitsandbytes']}",
        "- Sections (seconds, 1-minute load average before → after): "
        + ", ".join(
            f"{name} ({s['seconds']:.0f} s, {s['load_before']:.1f} → {s['load_after']:.1f})"
            for name, s in report["sections"].items()
        ),
        *goals(report["sections"]),
    ]
    for index, (name, record) in enumerate(report["sections"].items(), start=1):
        if "error" in record:
            lines += ["", f"## {index}. {name}: failed", "", f"`{record['error']}`"]
        else:
            body = section_module(name).markdown(record["result"])
            lines += ["", f"## {index}. {body.removeprefix('## ').strip()}"]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], stem: Path) -> Path:
    """STEM.json and STEM.md, each atomically (a kill half-way leaves the previous version,
    never a truncated file); returns the .md path."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic.write_text(stem.with_suffix(".md"), render(report))
    return stem.with_suffix(".md")


# --- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--quick, --only, --work-dir."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs of every section")
    choices = ", ".join([*SECTIONS, *EXTRA])
    parser.add_argument("--only", help=f"comma-separated sections of {choices}")
    parser.add_argument("--work-dir", type=Path, help="keep run folders here (default: tmp)")
    parser.add_argument(
        "--seeds",
        help="comma-separated seeds replacing the form's (e.g. --quick --seeds 0,1,2: the quick "
        "form's sizes, 3 seeds), for sections whose form has seeds",
    )
    args = parser.parse_args(argv)
    args.sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [s for s in args.sections if s not in SECTIONS and s not in EXTRA]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {choices}")
    if args.seeds is not None:
        try:
            args.seeds = tuple(int(seed) for seed in args.seeds.split(","))
        except ValueError:
            parser.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
        unseeded = [s for s in args.sections if not seeded(section_module(s))]
        if unseeded:
            parser.error(f"--seeds: section(s) {', '.join(unseeded)} have no seeds to replace")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the sections, rewriting the results after each; exit 1 if one failed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    info = machine_info()
    report: dict[str, Any] = {
        "machine": info,
        "slug": machine_slug(info),
        "quick": args.quick,
        "command": " ".join(
            ["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)]
        ),
        "sections": {},
    }
    partial = "" if args.sections == list(SECTIONS) else "-" + "-".join(args.sections)
    if args.seeds is not None:  # apart from the same sections' run at the form's own seeds
        partial += "-seeds-" + "-".join(str(seed) for seed in args.seeds)
    stem = RESULTS_DIR / f"{datetime.date.today().isoformat()}-{report['slug']}{partial}"
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        for name in args.sections:
            print(f"=== {name} ===", flush=True)
            report["sections"][name] = run_section(name, args.quick, work_dir, args.seeds)
            print(f"=== {name}: wrote {write(report, stem)}", flush=True)
    failed = [name for name, s in report["sections"].items() if "error" in s]
    if failed:
        print(f"error: section(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
