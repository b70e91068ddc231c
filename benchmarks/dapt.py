"""Task-adaptive pretraining (TAPT) measured downstream: our MLM recipe on IMDB reviews
without their labels, then our full fine-tuning on a small labelled share, against the same
fine-tuning from the model as shipped, scored on IMDB test rows.

all-MiniLM-L6-v2 ships no MLM head, so the MLM run starts with a random one (issue 18,
part 4): the arms run it without and with the head warm-up (train.head_warmup_ratio, only
the new head learning for the first steps), and, in the full form, with other learning
rates, masking and lengths of the DAPT recipe (configs/mlm-domain-adaptive-pretraining.yaml),
so that the recipe's defaults are judged by the downstream number, not by MLM perplexity.

Data: `../shared/data/imdb/` (or $STEADYTRAIN_IMDB), IMDB reviews (Maas et al., 2011). The
unlabelled TAPT texts are train rows (the labelled share among them, as in Gururangan et al.,
2020, "Don't Stop Pretraining"); the validation rows that pick the best epoch are other train
rows; the test rows are never trained on. Every fine-tuning has the same budget (epochs,
batch, max_length, learning rate), per-epoch evaluation, no layer-wise LR decay and no early
stopping, and starts from the shipped model or from the TAPT run's final/ folder.
"""

from __future__ import annotations

import functools
import json
import os
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import engine, kept
from benchmarks.common import ROOT, column_table, fmt, load_warning, run_measured
from benchmarks.models import model_path
from benchmarks.quality import imdb_rows, write_rows

DATA = Path(os.environ.get("STEADYTRAIN_IMDB", ROOT.parent / "shared" / "data" / "imdb"))
TAPT_RECIPE = ROOT / "configs" / "mlm-domain-adaptive-pretraining.yaml"
FINETUNE_RECIPE = ROOT / "configs" / "sentiment-full-finetune.yaml"
BASELINE = "fine-tune alone"


@dataclass(frozen=True)
class Form:
    """The rows, the TAPT budget and the fine-tuning budget (the same for every arm)."""

    tapt_rows: int  # unlabelled train texts for MLM
    labelled_rows: int  # of them, the labelled share fine-tuned on
    validation_rows: int
    test_rows: int
    tapt_steps: int
    seeds: tuple[int, ...]
    tapt_batch_size: int = 32
    max_length: int = 128
    epochs: int = 3
    batch_size: int = 16
    variants: tuple[str, ...] = ()  # extra TAPT arms beyond ARMS' first two (see ARMS)


# TAPT arms: MLM overrides on top of the DAPT recipe (None: no TAPT)
ARMS: dict[str, dict | None] = {
    BASELINE: None,
    "TAPT, no head warm-up": {"train": {"head_warmup_ratio": 0.0}},
    "TAPT, head warm-up (default)": {},
    "TAPT, head warm-up 0.3": {"train": {"head_warmup_ratio": 0.3}},
    "TAPT, lr 1e-4": {"train": {"lr": 1e-4}},
    "TAPT, no whole-word masking": {"mlm": {"whole_word_masking": False}},
}
CORE_ARMS = (BASELINE, "TAPT, no head warm-up", "TAPT, head warm-up (default)")

FORMS = {
    False: Form(
        tapt_rows=3000,
        labelled_rows=500,
        validation_rows=200,
        test_rows=1000,
        tapt_steps=300,
        seeds=(0, 1, 2),
        variants=("TAPT, head warm-up 0.3", "TAPT, lr 1e-4", "TAPT, no whole-word masking"),
    ),
    True: Form(
        tapt_rows=1000,
        labelled_rows=200,
        validation_rows=100,
        test_rows=300,
        tapt_steps=30,
        seeds=(0,),
        epochs=2,
    ),
}


# --- data ----------------------------------------------------------------------------------


def split(form: Form, work_dir: Path) -> dict[str, str]:
    """tapt.txt (a review a line, no labels), labelled / validation csv (carved from IMDB
    train, seed 0, disjoint) and test csv."""
    train = imdb_rows(DATA / "train_4000.csv")
    random.Random(0).shuffle(train)
    test = imdb_rows(DATA / "test_5000.csv")
    random.Random(0).shuffle(test)
    if form.tapt_rows + form.validation_rows > len(train) or form.test_rows > len(test):
        raise ValueError("the form needs more IMDB rows than the subset holds")
    if form.labelled_rows > form.tapt_rows:
        raise ValueError("the labelled share must be among the TAPT texts")
    unlabelled = (" ".join(r["text"].split()) for r in train[: form.tapt_rows])
    tapt = work_dir / "tapt.txt"
    tapt.write_text("".join(f"{text}\n" for text in unlabelled))
    validation = train[form.tapt_rows : form.tapt_rows + form.validation_rows]
    return {
        "tapt": str(tapt),
        "labelled": write_rows(work_dir / "labelled.csv", train[: form.labelled_rows]),
        "validation": write_rows(work_dir / "validation.csv", validation),
        "test": write_rows(work_dir / "test.csv", test[: form.test_rows]),
    }


# --- the runs ------------------------------------------------------------------------------


def tapt(name: str, arm: dict, seed: int, form: Form, files: dict, work_dir: Path) -> dict:
    """The DAPT recipe on the unlabelled texts, `arm` overriding it; its final/ folder and
    what its summary says of the new head."""
    settings = {
        "model": {"name_or_path": model_path()},
        "data": {
            "train": files["tapt"],
            "validation": None,
            "max_length": form.max_length,
            "cache_dir": str(work_dir / "cache"),
        },
        "train": {"max_steps": form.tapt_steps, "global_batch_size": form.tapt_batch_size},
        "eval": {"every_steps": 0},
        "log": {"trackers": []},
    }
    for section, values in arm.items():
        settings[section] = {**settings.get(section, {}), **values}
    settings["train"]["seed"] = seed
    run = engine.train(work_dir / f"tapt-{name}-{seed}", settings, TAPT_RECIPE)
    summary = run.read("run_summary.json")
    losses = [w["loss"] for w in run.windows]
    return {
        "final": str(run.run_dir / "final"),
        "wall_s": run.measured.wall_s,
        "head_warmup_steps": summary["head_warmup_steps"],
        "new_parameter_count": summary["new_parameter_count"],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def finetune(name: str, start: str, seed: int, form: Form, files: dict, work_dir: Path) -> dict:
    """The full fine-tuning recipe from `start` at the form's budget (per-epoch evaluation,
    no LLRD, no early stopping), then `trainer evaluate` of its final/ on test."""
    settings = {
        "model": {"name_or_path": start},
        "data": {
            "train": files["labelled"],
            "validation": files["validation"],
            "max_length": form.max_length,
            "cache_dir": str(work_dir / "cache"),
        },
        "train": {
            "epochs": form.epochs,
            "global_batch_size": form.batch_size,
            "micro_batch_size": form.batch_size,
            "layerwise_lr_decay": 1.0,
            "seed": seed,
        },
        "eval": {"every_steps": 0, "early_stopping_patience": 0},
        "log": {"trackers": []},
    }
    run = engine.train(work_dir / f"ft-{name}-{seed}", settings, FINETUNE_RECIPE)
    scored = work_dir / f"ft-{name}-{seed}-test.log"
    final = str(run.run_dir / "final")
    run_measured(engine.trainer_command("evaluate", final, "--data", files["test"]), scored)
    test = json.loads(scored.read_text().strip().splitlines()[-1])
    summary = run.read("run_summary.json")
    return {
        "accuracy": test["accuracy"],
        "f1": test["f1"],
        "wall_s": run.measured.wall_s,
        "new_parameters": summary["new_parameters"],
    }


def one_arm(arm: str, seed: int, form: Form, files: dict, work_dir: Path) -> dict[str, Any]:
    """One arm's TAPT (none for fine-tuning alone) and fine-tuning from its result."""
    record: dict[str, Any] = {"seed": seed}
    start = model_path()
    if ARMS[arm] is not None:
        record["tapt"] = tapt(kept.slug(arm), ARMS[arm], seed, form, files, work_dir)
        start = record["tapt"]["final"]
    return record | finetune(kept.slug(arm), start, seed, form, files, work_dir)


def run(quick: bool, work_dir: Path, form: Form | None = None) -> dict[str, Any]:
    """Every arm for each seed, seeds outermost, so that a change in background load hits
    the arms alike. `form` replaces the quick/full one (a form between the two)."""
    form = form or FORMS[quick]
    files = split(form, work_dir)
    arms = [*CORE_ARMS, *form.variants]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    loads = []
    for seed in form.seeds:
        for arm in arms:
            print(f"[dapt] {arm}, seed {seed} ...", flush=True)
            before = os.getloadavg()[0]
            key = {"arm": arm, "seed": seed, "form": kept.form_key(form)}
            compute = functools.partial(one_arm, arm, seed, form, files, work_dir)
            runs[arm].append(kept.run(work_dir / f"{kept.slug(arm)}-{seed}.json", key, compute))
            loads.append(max(before, os.getloadavg()[0]))
    return {"form": asdict(form), "runs": runs, "loads": loads}


# --- the results ---------------------------------------------------------------------------


def _mean(records: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in records)


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return fmt(values[0], 4)
    return f"{statistics.fmean(values):.4f} ({min(values):.4f}–{max(values):.4f})"


def gains(runs: dict[str, list[dict]]) -> dict[str, float]:
    """Each TAPT arm's mean test accuracy minus fine-tuning alone's, in points."""
    base = _mean(runs[BASELINE], "accuracy")
    return {arm: (_mean(r, "accuracy") - base) * 100 for arm, r in runs.items() if arm != BASELINE}


def _tapt_cell(records: list[dict], key: str, digits: int = 0) -> str:
    values = [r["tapt"][key] for r in records if "tapt" in r and r["tapt"][key] is not None]
    return fmt(statistics.fmean(values), digits) if values else ""


def markdown(result: dict[str, Any]) -> str:
    """Settings, one row per arm (test accuracy, its gain over fine-tuning alone, the TAPT
    run's head warm-up and MLM loss), then the published expectation next to ours."""
    form = Form(
        **{
            **result["form"],
            "seeds": tuple(result["form"]["seeds"]),
            "variants": tuple(result["form"]["variants"]),
        }
    )
    runs, gain = result["runs"], gains(result["runs"])
    columns = [
        ("arm", lambda a: a),
        ("test accuracy, mean (min–max)", lambda a: _cell([r["accuracy"] for r in runs[a]])),
        ("test F1", lambda a: _cell([r["f1"] for r in runs[a]])),
        ("gain (points)", lambda a: "" if a == BASELINE else f"{gain[a]:+.2f}"),
        ("head warm-up steps", lambda a: _tapt_cell(runs[a], "head_warmup_steps")),
        ("MLM loss first → last", lambda a: _mlm_losses(runs[a])),
        ("wall time (s)", lambda a: fmt(statistics.fmean(_wall(r) for r in runs[a]), 0)),
    ]
    best = max(gain.values()) if gain else 0.0
    lines = [
        "## TAPT → fine-tune on IMDB, against fine-tuning alone",
        "",
        f"all-MiniLM-L6-v2 (no MLM head shipped). TAPT: configs/mlm-domain-adaptive-"
        f"pretraining.yaml on {form.tapt_rows} IMDB train reviews without labels, "
        f"{form.tapt_steps} steps at batch {form.tapt_batch_size}, max_length "
        f"{form.max_length}. Fine-tuning: configs/sentiment-full-finetune.yaml on "
        f"{form.labelled_rows} of those reviews with labels, {form.epochs} epochs at batch "
        f"{form.batch_size}, max_length {form.max_length}, per-epoch evaluation on "
        f"{form.validation_rows} other train rows (best epoch kept), no layer-wise LR decay, "
        f"no early stopping; scored on {form.test_rows} IMDB test rows; seeds "
        f"{list(form.seeds)}.",
        *load_warning(result["loads"]),
        "",
        *column_table(columns, list(runs)),
        "",
        f"Published expectation (Gururangan et al., 2020): TAPT gains 1–3 points. Best gain "
        f"here: {best:+.2f} points.",
    ]
    return "\n".join(lines)


def _mlm_losses(records: list[dict]) -> str:
    first, last = _tapt_cell(records, "first_loss", 2), _tapt_cell(records, "last_loss", 2)
    return f"{first} → {last}" if first else ""


def _wall(record: dict) -> float:
    """Seconds of the arm: its TAPT run and its fine-tuning."""
    return record["wall_s"] + record.get("tapt", {}).get("wall_s", 0.0)
