"""QLoRA on this CPU with and without the engine's 4-bit layout guard
(`trainer.model.adapters.keep_4bit_layout`): loss curves with evaluations in the middle, and the
merged export's own logit check.

What it measures
----------------
bitsandbytes 0.49/0.50 repacks a 4-bit weight in place for its bf16 inference kernel the
first time a layer runs in eval mode without gradients, on CPUs with AVX512-BF16 only; the
guard keeps QLoRA off that path. Each model is trained three ways, each in a fresh process:

* ``guarded``: the engine as shipped.
* ``no-repacking``: the guard off, and bitsandbytes told the CPU lacks AVX512-BF16
  (`bitsandbytes.nn.modules.has_avx512bf16` returns False before any layer is built): what
  a CPU without it runs, and the baseline. On such a CPU the guard changes nothing, so
  ``guarded`` must equal it to the last digit.
* ``unguarded``: the guard off, bitsandbytes as it is on this CPU.

Models: a tiny BERT built from all-MiniLM-L6-v2's config (2 layers, hidden 32, random
weights, seed 0; narrower than one 64-wide quantization block) and all-MiniLM-L6-v2 itself
(hidden 384). Job: sentiment classification on data/sentiment (360 train / 100 validation
rows), max_length 64, batch 16, QLoRA r 8 on peft's default targets, lr 3e-3, fp32, 24
steps, evaluating every 8 (a third of the steps), a loss logged every step. After
training, `trainer export --merge` under the same variant (its check: max |logit
difference| ≤ 1e-4).

How to run
----------
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/qlora_layout.py [--steps 24]

Results go to benchmarks/results/<YYYY-MM-DD>-qlora-layout.{md,json}. About 3 minutes on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py

from _common import ROOT, machine_info, model_path, read_jsonl, write_results

VARIANTS = ("guarded", "no-repacking", "unguarded")


def child(variant: str, argv: list[str]) -> int:
    """Run the trainer CLI in this process under `variant` (see the module docstring)."""
    if variant != "guarded":
        import trainer.model.adapters

        trainer.model.adapters.keep_4bit_layout = lambda model: None
    if variant == "no-repacking":
        import bitsandbytes.nn.modules

        bitsandbytes.nn.modules.has_avx512bf16 = lambda: False
    from trainer.cli import main

    return main(argv)


def tiny_bert(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, random weights (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(model_path())
    config.update(
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        }
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_path()).save_pretrained(folder)
    return folder


def run_variant(variant: str, model: Path, work: Path, steps: int) -> dict:
    """Train, then export --merge, in fresh processes; the curve and what each returned."""
    run_dir = work / variant / "run"
    overrides = [
        "task=classification",
        f"output_dir={run_dir}",
        f"model.name_or_path={model}",
        f"data.train={ROOT / 'data/sentiment/train.csv'}",
        f"data.validation={ROOT / 'data/sentiment/validation.csv'}",
        "data.max_length=64",
        f"data.cache_dir={work / 'cache'}",
        "peft.method=qlora",
        "peft.r=8",
        f"train.max_steps={steps}",
        "train.global_batch_size=16",
        "train.micro_batch_size=16",
        "train.lr=3e-3",
        "train.seed=42",
        f"eval.every_steps={max(steps // 3, 1)}",
        "log.every_steps=1",
        "log.trackers=[]",
    ]
    config = work / "run.yaml"
    config.write_text("{}\n")
    trained = self_call(variant, ["train", str(config), *overrides], work / f"{variant}.log")
    record = {"train_rc": trained["rc"], "train_error": trained["error"]}
    metrics = run_dir / "metrics.jsonl"
    record["curve"] = [
        {k: v for k, v in r.items() if k == "step" or k in ("loss", "eval_loss")}
        for r in (read_jsonl(metrics) if metrics.is_file() else [])
    ]
    if trained["rc"] == 0:
        merged = work / variant / "merged"
        exported = self_call(
            variant,
            ["export", str(run_dir), "--merge", "--out", str(merged)],
            work / f"{variant}-export.log",
        )
        record.update(export_rc=exported["rc"], export_error=exported["error"])
    return record


def self_call(variant: str, argv: list[str], log: Path) -> dict:
    """This script as a child process running the CLI under `variant`."""
    command = [sys.executable, __file__, "--child", variant, "--", *argv]
    with log.open("w") as out:
        rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    lines = log.read_text().splitlines()
    errors = [line for line in lines if line.startswith(("error:", "RuntimeError"))]
    return {"rc": rc, "error": errors[-1] if errors else None}


def largest_difference(curve: list[dict], baseline: list[dict]) -> float | None:
    """Max |difference| of the losses at the same records; None if the curves differ in
    shape (a run that stopped early)."""
    if [sorted(r) for r in curve] != [sorted(r) for r in baseline] or not curve:
        return None
    return max(
        abs(a[k] - b[k]) for a, b in zip(curve, baseline, strict=True) for k in a if k != "step"
    )


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# QLoRA's 4-bit layout on this CPU ({m['date']})",
        "",
        f"- CPU: {m['cpu']}, {m['cpu_cores']} cores; bf16: {m['cpu_bf16']}",
        f"- torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"bitsandbytes {m['bitsandbytes']}",
        f"- {report['steps']} steps, evaluation every {max(report['steps'] // 3, 1)}; see "
        "`benchmarks/qlora_layout.py` for the variants",
        "",
    ]
    for name, variants in report["models"].items():
        baseline = variants["no-repacking"]["curve"]
        lines += [
            f"## {name}",
            "",
            "| variant | train | export --merge | max abs loss diff vs no-repacking |",
            "|---|---|---|---:|",
        ]
        for variant, r in variants.items():
            diff = largest_difference(r["curve"], baseline)
            train = "ok" if r["train_rc"] == 0 else f"exit {r['train_rc']}: `{r['train_error']}`"
            export = {None: "not run", 0: "ok"}.get(
                r.get("export_rc"), f"exit {r.get('export_rc')}: `{r.get('export_error')}`"
            )
            shown = "n/a (stopped early)" if diff is None else f"{diff:.3g}"
            lines.append(f"| {variant} | {train} | {export} | {shown} |")
        lines += ["", "| step | " + " | ".join(f"{v} loss / eval loss" for v in variants) + " |"]
        lines.append("|---:|" + "---|" * len(variants))
        by_step: dict[int, dict[str, list[str]]] = {}
        for variant, r in variants.items():
            for record in r["curve"]:
                cell = by_step.setdefault(record["step"], {}).setdefault(variant, [])
                cell.append(
                    f"{record.get('loss', record.get('eval_loss')):.6f}"
                    + (" (eval)" if "eval_loss" in record else "")
                )
        for step, cells in sorted(by_step.items()):
            row = " | ".join(", ".join(cells.get(v, ["—"])) for v in variants)
            lines.append(f"| {step} | {row} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.rest)
    report = {"machine": machine_info(extra_packages=("peft", "bitsandbytes")), "steps": args.steps}
    report["models"] = {}
    with tempfile.TemporaryDirectory(prefix="qlora-layout-") as tmp:
        work = Path(tmp)
        models = {
            "tiny BERT (hidden 32)": tiny_bert(work / "tiny-bert"),
            "all-MiniLM-L6-v2 (hidden 384)": Path(model_path()),
        }
        for index, (name, model) in enumerate(models.items()):
            folder = work / f"model-{index}"
            folder.mkdir()
            report["models"][name] = {
                v: run_variant(v, model, folder, args.steps) for v in VARIANTS
            }
            print(
                f"[qlora-layout] {name}: "
                + json.dumps({v: r["train_rc"] for v, r in report["models"][name].items()})
            )
    print(f"wrote {write_results(report, 'qlora-layout', markdown(report))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
