"""The seed's scenario B, few labelled rows: our LoRA and full fine-tuning recipes, and the
LoRA recipe with EDA augmentation, on 500 IMDB training rows (issue 18).

    python -m benchmarks.run --only small-data [--quick]

The data, model and scoring are the quality section's (benchmarks/quality.py): rows of the
IMDB train subset (the validation rows carved after them, seed 0), all-MiniLM-L6-v2, each
final/ scored by `trainer evaluate` on rows of the IMDB test subset. Each recipe runs as
shipped (its learning rate, its evaluation each epoch and best model on validation), with
only the model, the data and the budget overridden. EDA: `data.augment.copies` variants of
each row per epoch (every operation at its default 0.1, the synonym table shipped with
data/sentiment), so that arm takes 1 + copies times the steps: the question is whether the
seed's advice, LoRA plus augmentation against overfitting on small data, pays here.

A fourth arm trains LoRA for 1 + copies times the epochs, as many steps as the EDA arm
takes, so that a gain of EDA's can be told from one of training longer.

`--quick`: one seed and 300 test rows, about 18 minutes on 2 idle cores; the full form
(3 seeds, 1,000 test rows) about an hour.
"""

from __future__ import annotations

import functools
import os
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks import kept, quality
from benchmarks.common import ROOT, column_table, fmt, load_warning

SYNONYMS = ROOT / "data" / "sentiment" / "synonyms.tsv"
COPIES = 2
# arm: (recipe, data.augment settings, epochs as a multiple of the form's)
ARMS: dict[str, tuple[str, dict, int]] = {
    "LoRA": ("lora", {}, 1),
    "full": ("full", {}, 1),
    "LoRA + EDA": ("lora", {"copies": COPIES, "synonyms": str(SYNONYMS)}, 1),
    # as many steps as LoRA + EDA without it: whether a gain is the edits' or the steps'
    "LoRA, 3x epochs": ("lora", {}, 1 + COPIES),
}
FORMS = {
    False: quality.Form(500, 100, 1000, 128, (0, 1, 2), epochs=4),
    True: quality.Form(500, 100, 300, 128, (0,), epochs=4),
}


def run(quick: bool, work_dir: Path, form: quality.Form | None = None) -> dict[str, Any]:
    """Every arm for each seed, arms interleaved per seed; a run finished by an earlier call
    with the same work_dir and code is kept (benchmarks/kept.py)."""
    form = form or FORMS[quick]
    files = quality.split(form, work_dir)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    loads = []
    for seed in form.seeds:
        for arm, (method, augment, longer) in ARMS.items():
            print(f"[small-data] {arm} seed {seed} ...", flush=True)
            before = os.getloadavg()[0]
            arm_form = replace(form, epochs=form.epochs * longer)
            key = {"arm": arm, "seed": seed, "form": kept.form_key(arm_form)}
            compute = functools.partial(
                quality.ours, method, seed, arm_form, files, work_dir, augment
            )
            runs[arm].append(kept.run(work_dir / f"{kept.slug(arm)}-{seed}.json", key, compute))
            loads.append(max(before, os.getloadavg()[0]))
    return {"form": asdict(form), "copies": COPIES, "runs": runs, "loads": loads}


def goals(runs: dict[str, list[dict]]) -> list[tuple[str, bool]]:
    """What the seed's advice claims, as checks: LoRA at least full fine-tuning, and EDA
    adding to LoRA, also against LoRA trained as many steps (mean test accuracy over the
    seeds)."""
    mean = {arm: statistics.fmean(r["accuracy"] for r in found) for arm, found in runs.items()}

    def check(one: str, relation: str, other: str) -> tuple[str, bool]:
        holds = mean[one] >= mean[other] if relation == "≥" else mean[one] > mean[other]
        return f"{one} {relation} {other} ({mean[one]:.4f} vs {mean[other]:.4f})", holds

    return [
        check("LoRA", "≥", "full"),
        check("LoRA + EDA", ">", "LoRA"),
        check("LoRA + EDA", ">", "LoRA, 3x epochs"),
    ]


def markdown(result: dict[str, Any]) -> str:
    """Settings, one row per arm (mean and range over the seeds), then the checks."""
    form, runs = result["form"], result["runs"]

    def cell(arm: str, key: str, digits: int = 4) -> str:
        values = [r[key] for r in runs[arm]]
        mean = fmt(statistics.fmean(values), digits)
        return mean if len(values) == 1 else f"{mean} ({min(values):.4f}–{max(values):.4f})"

    columns = [
        ("arm", lambda arm: arm),
        ("test accuracy, mean (min–max)", lambda arm: cell(arm, "accuracy")),
        ("test F1", lambda arm: cell(arm, "f1")),
        ("steps", lambda arm: str(runs[arm][0]["steps"])),
        ("wall time (s)", lambda arm: fmt(statistics.fmean(r["wall_s"] for r in runs[arm]), 0)),
        (
            "trainable share",
            lambda arm: fmt(runs[arm][0]["trainable_parameters"] / runs[arm][0]["parameters"], 4),
        ),
    ]
    return "\n".join(
        [
            f"## Small data (scenario B): {form['train_rows']} IMDB rows, LoRA, full, LoRA + EDA",
            "",
            f"all-MiniLM-L6-v2; {form['train_rows']} rows of the IMDB train subset, "
            f"{form['validation_rows']} validation rows carved after them (seed 0), scored on "
            f"{form['test_rows']} rows of the IMDB test subset; {form['epochs']} epochs, global "
            f"batch {form['batch_size']}, max_length {form['max_length']}, seeds "
            f"{list(form['seeds'])}; each recipe as shipped (its learning rate, evaluation "
            f"each epoch, best model on validation); EDA: `data.augment.copies: "
            f"{result['copies']}` with data/sentiment/synonyms.tsv, so {1 + result['copies']}x "
            "the steps, as many as the 3x-epochs arm.",
            *load_warning(result["loads"]),
            "",
            *column_table(columns, list(runs)),
            "",
            "| check | holds |",
            "|---|---|",
            *(f"| {goal} | {'yes' if met else 'no'} |" for goal, met in goals(runs)),
        ]
    )
