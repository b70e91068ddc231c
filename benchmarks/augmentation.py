"""Does EDA augmentation (`data.augment`) help a small training set?

For each seed, 40 rows drawn from data/sentiment/train.csv (20 per label, the draw seeded),
scored on the 100 validation reviews, all-MiniLM-L6-v2, one evaluation at the end (the
final model, so that validation does not pick a checkpoint). Three arms on the same rows
and seed (which also seeds the new head, the data order and the augmentation): ``plain``;
``eda``, 2 variants per row per epoch (all four operations at 0.1, the shipped synonym
table), so 3 times the steps; ``plain-long``, no augmentation and as many steps as ``eda``:
whether a gain comes from the augmented texts or only from training longer.
"""

from __future__ import annotations

import csv
import random
import statistics
from pathlib import Path
from typing import Any

from benchmarks import engine
from benchmarks.common import ROOT, column_table, fmt
from benchmarks.models import model_path

TRAIN = ROOT / "data" / "sentiment" / "train.csv"
VALIDATION = ROOT / "data" / "sentiment" / "validation.csv"
SYNONYMS = ROOT / "data" / "sentiment" / "synonyms.tsv"
ROWS_PER_LABEL = 20
ARMS = ("plain", "eda", "plain-long")
COPIES = 2  # data.augment.copies of eda


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


def run(quick: bool, work_dir: Path) -> dict[str, Any]:
    """Every arm for seeds 0-2, 6 epochs (`quick`: seed 0, 2 epochs), arms interleaved per
    seed; each run a fresh `trainer train`."""
    seeds, epochs = ([0], 2) if quick else ([0, 1, 2], 6)
    runs = []
    for seed in seeds:
        train = subsample(seed, work_dir / f"train-seed{seed}.csv")
        for arm in ARMS:
            print(f"[augmentation] {arm}, seed {seed} ...", flush=True)
            runs.append(run_one(arm, seed, epochs, train, work_dir))
    return {
        "settings": {"rows": 2 * ROWS_PER_LABEL, "copies": COPIES, "epochs": epochs},
        "runs": runs,
    }


def run_one(arm: str, seed: int, epochs: int, train: Path, work_dir: Path) -> dict[str, Any]:
    """One arm: max_length 48 (the longest review has 47 tokens), batch 8, lr 1e-4."""
    augment = {"copies": COPIES, "synonyms": str(SYNONYMS)} if arm == "eda" else {}
    data = {"train": str(train), "validation": str(VALIDATION), "max_length": 48}
    train_ = {"global_batch_size": 8, "micro_batch_size": 8, "lr": 1e-4, "warmup_ratio": 0.1}
    settings = {
        "task": "classification",
        "model": {"name_or_path": model_path()},
        "data": {**data, "augment": augment},
        "train": {
            **train_,
            "seed": seed,
            "epochs": epochs * (1 + COPIES if arm == "plain-long" else 1),
        },
        "eval": {"every_steps": 10**9},  # only the evaluation at the end
        "log": {"every_steps": 5, "trackers": []},
    }
    run = engine.train(work_dir / f"{arm}-seed{seed}", settings)
    results = run.read("eval_results.json")
    return {
        "arm": arm,
        "seed": seed,
        "steps": results["steps"],
        "examples_per_epoch": run.read("run_summary.json")["examples_per_epoch"],
        "accuracy": results["accuracy"],
        "f1": results["f1"],
        "eval_loss": results["loss"],
        "wall_s": round(run.measured.wall_s, 1),
        "load_before": run.measured.load_before,
    }


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` (sd over seeds; just the mean for one seed)."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


RUNS = [
    ("arm", lambda r: r["arm"]),
    ("seed", lambda r: r["seed"]),
    ("steps", lambda r: r["steps"]),
    ("accuracy", lambda r: fmt(r["accuracy"])),
    ("F1", lambda r: fmt(r["f1"])),
    ("eval loss", lambda r: fmt(r["eval_loss"])),
    ("wall s", lambda r: r["wall_s"]),
]
ARM_COLUMNS = [
    ("arm", lambda a: a[0]),
    ("accuracy", lambda a: mean_sd([r["accuracy"] for r in a[1]])),
    ("F1", lambda a: mean_sd([r["f1"] for r in a[1]])),
    ("eval loss", lambda a: mean_sd([r["eval_loss"] for r in a[1]])),
]


def markdown(result: dict[str, Any]) -> str:
    """Every run, then each arm's mean ± sd over the seeds."""
    runs, settings = result["runs"], result["settings"]
    arms = [(arm, [r for r in runs if r["arm"] == arm]) for arm in ARMS]
    return "\n".join(
        [
            f"## EDA augmentation on {settings['rows']} sentiment rows",
            "",
            f"{settings['epochs']} epochs, eda with `data.augment.copies: {settings['copies']}`"
            "; all-MiniLM-L6-v2, max_length 48, batch 8, lr 1e-4, scored once at the end on "
            "the 100 validation reviews.",
            "",
            *column_table(RUNS, runs),
            "",
            *column_table(ARM_COLUMNS, arms),
        ]
    )
