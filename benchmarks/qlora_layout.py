"""QLoRA with and without the engine's 4-bit layout guard (`keep_4bit_layout`): loss curves
with evaluations in the middle, and `trainer export --merge`'s own logit check. A
correctness check for CPUs with AVX512-BF16, where bitsandbytes 0.49/0.50 repacks a 4-bit
weight in place the first time a layer runs in eval mode without gradients.

Each model (a tiny BERT narrower than one 64-wide quantization block, and all-MiniLM-L6-v2)
trains three ways, each a fresh process (the worker "cli"): ``guarded`` (as shipped),
``no-repacking`` (guard off, bitsandbytes told the CPU lacks AVX512-BF16: the baseline,
what any other CPU runs; ``guarded`` must equal it to the last digit) and ``unguarded``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import ROOT, read_jsonl, run_worker, table
from benchmarks.models import build_bert, model_path

VARIANTS = ("guarded", "no-repacking", "unguarded")
SENTIMENT = ROOT / "data" / "sentiment"


def cli_variant(spec: dict) -> dict:
    """The worker "cli": the trainer CLI in this process under `spec["variant"]`; exits
    with the CLI's status."""
    if spec["variant"] != "guarded":
        import trainer.model.adapters

        trainer.model.adapters.keep_4bit_layout = lambda model: None
    if spec["variant"] == "no-repacking":  # before any layer is built
        import bitsandbytes.nn.modules

        bitsandbytes.nn.modules.has_avx512bf16 = lambda: False
    from trainer.cli import main

    code = main(spec["argv"])
    if code:
        raise SystemExit(code)
    return {}


def run(quick: bool, work_dir: Path) -> dict[str, Any]:
    """Both models, each variant: 24 steps (`quick`: 12)."""
    steps = 12 if quick else 24
    models = {
        "tiny BERT (hidden 32)": build_bert(work_dir / "tiny-bert", 2, 32, 2, 64),
        "all-MiniLM-L6-v2 (hidden 384)": Path(model_path()),
    }
    found = {}
    for index, (name, model) in enumerate(models.items()):
        folder = work_dir / f"model-{index}"
        folder.mkdir(exist_ok=True)
        print(f"[qlora_layout] {name}: {', '.join(VARIANTS)} ...", flush=True)
        found[name] = {v: run_variant(v, model, folder, steps) for v in VARIANTS}
    return {"steps": steps, "models": found}


def run_variant(variant: str, model: Path, work: Path, steps: int) -> dict:
    """Train, then export --merge, in fresh processes; the curve and how each ended."""
    run_dir = work / variant / "run"
    data = {"train": str(SENTIMENT / "train.csv"), "validation": str(SENTIMENT / "validation.csv")}
    train = {"max_steps": steps, "global_batch_size": 16, "micro_batch_size": 16, "lr": 3e-3}
    settings = {
        "task": "classification",
        "output_dir": str(run_dir),
        "model": {"name_or_path": str(model)},
        "data": {**data, "max_length": 64, "cache_dir": str(work / "cache")},
        "peft": {"method": "qlora", "r": 8},
        "train": {**train, "seed": 42},
        "eval": {"every_steps": max(steps // 3, 1)},
        "log": {"every_steps": 1, "trackers": []},
    }
    config = work / f"{variant}.yaml"
    config.write_text(yaml.safe_dump(settings))
    trained = cli(variant, ["train", str(config)], work / f"{variant}.log")
    record = {"train_rc": trained["rc"], "train_error": trained["error"]}
    metrics = run_dir / "metrics.jsonl"
    record["curve"] = [
        {k: v for k, v in r.items() if k in ("step", "loss", "eval_loss")}
        for r in (read_jsonl(metrics) if metrics.is_file() else [])
    ]
    if trained["rc"] == 0:
        argv = ["export", str(run_dir), "--merge", "--out", str(work / variant / "merged")]
        exported = cli(variant, argv, work / f"{variant}-export.log")
        record.update(export_rc=exported["rc"], export_error=exported["error"])
    return record


def cli(variant: str, argv: list[str], log: Path) -> dict:
    """The CLI under `variant` in a fresh process: its exit status and last error line."""
    measured, _ = run_worker("cli", {"variant": variant, "argv": argv}, log, check=False)
    lines = log.read_text().splitlines()
    errors = [line for line in lines if line.startswith(("error:", "RuntimeError"))]
    return {"rc": measured.returncode, "error": errors[-1] if errors else None}


def largest_difference(curve: list[dict], baseline: list[dict]) -> float | None:
    """Max |difference| of the losses at the same records; None if the curves differ in
    shape (a run that stopped early)."""
    if [sorted(r) for r in curve] != [sorted(r) for r in baseline] or not curve:
        return None
    return max(
        abs(a[k] - b[k]) for a, b in zip(curve, baseline, strict=True) for k in a if k != "step"
    )


def ending(code: int | None, error: str | None) -> str:
    """How a step of a variant ended, for the table."""
    return {None: "not run", 0: "ok"}.get(code, f"exit {code}: `{error}`")


def markdown(result: dict[str, Any]) -> str:
    """Per model: how each variant ended and its distance from the baseline, then the loss
    curves side by side."""
    steps = result["steps"]
    lines = [
        "## QLoRA's 4-bit layout on this CPU: with and without the guard",
        "",
        f"{steps} steps, evaluation every {max(steps // 3, 1)}; the results header says "
        "whether this CPU computes bf16 natively (AVX512-BF16: bitsandbytes repacks there). "
        "See `benchmarks/qlora_layout.py` for the variants.",
    ]
    for name, variants in result["models"].items():
        baseline = variants["no-repacking"]["curve"]
        endings = []
        for variant, r in variants.items():
            diff = largest_difference(r["curve"], baseline)
            train = ending(r["train_rc"], r["train_error"])
            export = ending(r.get("export_rc"), r.get("export_error"))
            shown = "n/a (stopped early)" if diff is None else f"{diff:.3g}"
            endings.append([variant, train, export, shown])
        by_step: dict[int, dict[str, list[str]]] = {}
        for variant, r in variants.items():
            for record in r["curve"]:
                value = record.get("loss", record.get("eval_loss"))
                cell = f"{value:.6f}" + (" (eval)" if "eval_loss" in record else "")
                by_step.setdefault(record["step"], {}).setdefault(variant, []).append(cell)
        curves = [
            [step, *(", ".join(cells.get(v, ["—"])) for v in variants)]
            for step, cells in sorted(by_step.items())
        ]
        head = ["variant", "train", "export --merge", "max abs loss diff vs no-repacking"]
        lines += ["", f"### {name}", "", *table(head, endings), ""]
        lines += table(["step", *(f"{v} loss / eval loss" for v in variants)], curves)
    return "\n".join(lines)
