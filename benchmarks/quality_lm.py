"""Language-modelling quality on real text: our CLM and MLM recipes against plain
`transformers.Trainer` at one budget, by validation perplexity, on IMDB reviews.

The text is `../shared/data/imdb/` beside the checkout (or $STEADYTRAIN_IMDB), the reviews of
Maas et al. (2011), "Learning Word Vectors for Sentiment Analysis", without their labels:
the train subset's reviews to train on, a seeded sample of the test subset's to validate on.
Nothing comes from the hub: a tokenizer is trained on the training text by `trainer
tokenizer train` (byte-level BPE for CLM, WordPiece for MLM), and a small model is built
from config with it (GPT-2 or BERT, 4 layers, width 256) and saved with random weights,
which both sides start from, so that only training differs.

Both sides see the same texts, one review per document, packed into full blocks, and the
same budget: steps, batch, block length and peak learning rate. Ours runs each recipe as
shipped (its schedule, warm-up, weight decay and, for MLM, whole-word masking) with only
the model, the data and the budget overridden, evaluating once, at the end. Trainer runs
with its defaults (linear decay, no warm-up, no weight decay; DataCollatorForLanguageModeling's
token masking for MLM), the way run_clm / run_mlm do.

Both final models are then scored by one evaluator (`trainer evaluate`), so perplexity is
counted alike: exp of the mean loss over every predicted token of the validation blocks
(CLM: each position's next token; MLM: the 15% of tokens BERT's token masking selects, the
same masks for both). Each side's own figure is kept next to it.

The full form (all 4,000 reviews, 500 to validate on, 300 steps, 3 seeds) takes 20 to 30
minutes per task on 2 idle CPU cores (one CLM seed, both sides and scoring: 6 to 10);
`--quick` (1,000 reviews, 100, 40 steps, one seed) under 10 minutes.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import engine, hf_reference, kept
from benchmarks.common import ROOT, column_table, fmt, load_warning, run_measured
from benchmarks.comparison import Job

DATA = Path(os.environ.get("STEADYTRAIN_IMDB", ROOT.parent / "shared" / "data" / "imdb"))
RECIPES = {
    "clm": ROOT / "configs" / "clm-tiny-gpt2-from-scratch.yaml",
    "mlm": ROOT / "configs" / "mlm-domain-adaptive-pretraining.yaml",
}
TOKENIZERS = {"clm": "bpe", "mlm": "wordpiece"}
# How both final models are scored: BERT's token masking for MLM (run_mlm's perplexity),
# with masks drawn from one seed, so both sides are scored on the very same targets
SCORING = {"clm": [], "mlm": ["mlm.whole_word_masking=false"]}
SCORING_SEED = 0


@dataclass(frozen=True)
class Form:
    """How much text and how many seeds; the budget is the same for both sides."""

    train_texts: int
    validation_texts: int
    steps: int
    seeds: tuple[int, ...]
    batch_size: int = 16
    block: int = 128
    lr: float = 1e-3
    vocab_size: int = 8000
    layers: int = 4
    width: int = 256
    tasks: tuple[str, ...] = ("clm", "mlm")


FORMS = {
    False: Form(train_texts=4000, validation_texts=500, steps=300, seeds=(42, 0, 1)),
    True: Form(train_texts=1000, validation_texts=100, steps=40, seeds=(42,)),
}


# --- text, tokenizers and models -----------------------------------------------------------


def reviews(path: Path) -> list[str]:
    """The reviews of an IMDB csv, each on one line (its whitespace runs made one space)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the IMDB subset is missing (set STEADYTRAIN_IMDB)")
    with path.open(newline="") as handle:
        return [" ".join(row["text"].split()) for row in csv.DictReader(handle)]


def texts(form: Form, work_dir: Path) -> dict[str, str]:
    """train.txt (the first train reviews) and validation.txt (a seeded sample of the test
    reviews), one document per line, as both sides read text files."""
    train = reviews(DATA / "train_4000.csv")[: form.train_texts]
    test = reviews(DATA / "test_5000.csv")
    random.Random(0).shuffle(test)
    files = {"train": train, "validation": test[: form.validation_texts]}
    for name, lines in files.items():
        (work_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return {name: str(work_dir / f"{name}.txt") for name in files}


def train_tokenizer(task: str, form: Form, train: str, work_dir: Path) -> Path:
    """`trainer tokenizer train` on the training text, the kind the task's model needs (a
    folder left by an earlier run of the same form is reused)."""
    out = work_dir / f"{TOKENIZERS[task]}-{form.vocab_size}-{form.train_texts}"
    if (out / "tokenizer.json").is_file():
        return out
    command = engine.trainer_command(
        "tokenizer", "train", train, "--type", TOKENIZERS[task],
        "--vocab-size", str(form.vocab_size), "--out", str(out),
    )  # fmt: skip
    run_measured(command, work_dir / f"{out.name}.log")
    return out


def build_model(task: str, form: Form, tokenizer_dir: Path, folder: Path, seed: int) -> Path:
    """A GPT-2 (CLM) or BERT (MLM) of the form's shape, sized to the tokenizer, with seeded
    random weights, saved with the tokenizer: both sides' starting point (reused when it
    exists)."""
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"vocab_size": len(tokenizer), "max_position_embeddings": 512}
    if task == "clm":
        ends = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = transformers.GPT2Config(
            n_layer=form.layers, n_embd=form.width, n_head=form.width // 64, **shape, **ends
        )
        auto = transformers.AutoModelForCausalLM
    else:
        config = transformers.BertConfig(
            num_hidden_layers=form.layers,
            hidden_size=form.width,
            num_attention_heads=form.width // 64,
            intermediate_size=4 * form.width,
            pad_token_id=tokenizer.pad_token_id,
            **shape,
        )
        auto = transformers.AutoModelForMaskedLM
    torch.manual_seed(seed)
    auto.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- the two sides -------------------------------------------------------------------------


def score(model_dir: str, task: str, form: Form, validation: str, log: Path) -> dict:
    """`trainer evaluate` of a saved model on the validation text: the one way both sides'
    perplexity is counted."""
    overrides = [f"task={task}", f"data.max_length={form.block}", f"train.seed={SCORING_SEED}"]
    command = engine.trainer_command(
        "evaluate", model_dir, "--data", validation, *overrides, *SCORING[task]
    )
    run_measured(command, log)
    return json.loads(log.read_text().strip().splitlines()[-1])


def ours(task: str, seed: int, form: Form, files: dict, model: Path, work_dir: Path) -> dict:
    """The task's recipe as shipped, at the budget; its final/ scored."""
    name = f"ours-{task}-{seed}"
    settings = {
        "model": {"name_or_path": str(model), "tokenizer": str(model), "from_scratch": False},
        "data": {
            "train": files["train"],
            "validation": files["validation"],
            "validation_split": 0.0,
            "max_length": form.block,
            "cache_dir": str(work_dir / "cache"),
        },
        "train": {
            "max_steps": form.steps,
            "global_batch_size": form.batch_size,
            "micro_batch_size": form.batch_size,
            "lr": form.lr,
            "seed": seed,
        },
        "eval": {"every_steps": 0},  # once, at the end, as Trainer's side
        "log": {"every_steps": 10, "trackers": []},
    }
    run = engine.train(work_dir / name, settings, RECIPES[task])
    final = str(run.run_dir / "final")
    scored = score(final, task, form, files["validation"], work_dir / f"{name}-score.log")
    return {
        "perplexity": scored["perplexity"],
        "own_perplexity": run.read("eval_results.json")["perplexity"],
        "steps": run.read("eval_results.json")["steps"],
        "wall_s": run.measured.wall_s,
    }


def trainer(task: str, seed: int, form: Form, files: dict, model: Path, work_dir: Path) -> dict:
    """Plain Trainer with its defaults at the budget (run_clm / run_mlm); its model scored."""
    job = Job(
        name=f"{task}-{seed}",
        task=task,
        train=files["train"],
        validation=files["validation"],
        max_length=form.block,
        metrics=("perplexity", "loss"),
        max_steps=form.steps,
        lr=form.lr,
        batch_size=form.batch_size,
        warmup_ratio=0.0,
        weight_decay=0.0,
        seed=seed,
        log_every=10,
        keep_final=True,
    )
    side = hf_reference.run_job(job, str(model), work_dir)
    final = str(work_dir / f"hf-{job.name}" / "final")  # where run_job saved it
    scored = score(final, task, form, files["validation"], work_dir / f"hf-{job.name}-score.log")
    return {
        "perplexity": scored["perplexity"],
        "own_perplexity": side["metrics"]["perplexity"],
        "steps": side["steps"],
        "wall_s": side["wall_s"],
    }


SIDES = {"ours": ours, "Trainer": trainer}


def both_sides(
    task: str, seed: int, form: Form, files: dict, tokenizer: Path, work_dir: Path
) -> dict[str, dict]:
    """Both sides from one model drawn for the seed: kept together (benchmarks/kept.py),
    since a side of a rerun would start from another tokenizer's model."""
    folder = work_dir / f"{task}-init-{form.train_texts}-{seed}"
    start = build_model(task, form, tokenizer, folder, seed)
    pair = {}
    for side, function in SIDES.items():
        print(f"[quality-lm] seed {seed}: {task}, {side} ...", flush=True)
        pair[side] = function(task, seed, form, files, start, work_dir)
    return pair


def run(quick: bool, work_dir: Path, form: Form | None = None) -> dict[str, Any]:
    """The form's tasks and both sides, seed by seed, one run at a time: two torch
    processes on the same cores slow each other far more than twice (10-20x measured on 2
    cores), so runs side by side would measure the contention."""
    form = form or FORMS[quick]
    files = texts(form, work_dir)
    runs: dict[str, dict[str, list[dict]]] = {t: {s: [] for s in SIDES} for t in form.tasks}
    models = {t: train_tokenizer(t, form, files["train"], work_dir) for t in form.tasks}
    loads = []
    for seed in form.seeds:
        for task in form.tasks:
            before = os.getloadavg()[0]
            key = {"task": task, "seed": seed, "form": kept.form_key(form)}
            compute = functools.partial(both_sides, task, seed, form, files, models[task], work_dir)
            pair = kept.run(work_dir / f"{task}-{seed}.json", key, compute)
            for side in SIDES:
                runs[task][side].append(pair[side])
            loads.append(max(before, os.getloadavg()[0]))
    return {"form": asdict(form), "runs": runs, "loads": loads}


# --- the results ---------------------------------------------------------------------------


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return fmt(mean, 2)
    return f"{mean:.2f} ({min(values):.2f}–{max(values):.2f})"


def goals(runs: dict) -> list[tuple[str, bool]]:
    """The issue's goal: each recipe's mean perplexity at most Trainer's for its task."""
    mean = {
        (t, s): statistics.fmean(r["perplexity"] for r in runs[t][s]) for t in runs for s in runs[t]
    }
    return [
        (f"ours {t} perplexity ≤ Trainer {t} ({mean[t, 'ours']:.2f} vs {mean[t, 'Trainer']:.2f})",
         mean[t, "ours"] <= mean[t, "Trainer"])
        for t in runs
    ]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """Settings, one row per task and side, then the goals."""
    stored = result["form"]
    form = Form(
        **{**stored, "seeds": tuple(stored["seeds"]), "tasks": tuple(runs := result["runs"])}
    )
    rows = [(t, s, runs[t][s]) for t in runs for s in runs[t]]
    columns = [
        ("task", lambda r: r[0]),
        ("side", lambda r: r[1]),
        ("validation perplexity, mean (min–max)", lambda r: _cell([x["perplexity"] for x in r[2]])),
        ("the side's own figure", lambda r: _cell([x["own_perplexity"] for x in r[2]])),
        ("steps", lambda r: str(r[2][0]["steps"])),
        ("wall time (s)", lambda r: fmt(statistics.fmean(x["wall_s"] for x in r[2]), 0)),
    ]
    lines = [
        "## Language-modelling quality on IMDB text: our recipes vs transformers.Trainer",
        "",
        f"IMDB reviews (Maas et al., 2011), labels unused: {form.train_texts} train-subset "
        f"reviews to train on, {form.validation_texts} test-subset reviews (seeded sample) to "
        f"validate on. A {form.vocab_size}-token tokenizer trained on the training text (BPE "
        f"for CLM, WordPiece for MLM); GPT-2 / BERT with {form.layers} layers, width "
        f"{form.width}, from one seeded random init per seed for both sides; "
        f"{form.block}-token packed blocks, {form.steps} steps, batch {form.batch_size}, peak "
        f"lr {form.lr:g}, seeds {list(form.seeds)}. Ours: "
        f"{' and '.join(f'`{RECIPES[t].name}`' for t in form.tasks)} as shipped (schedule, "
        "warm-up, weight decay, masking), evaluated once at the end. Trainer: its defaults (linear "
        "decay, no warm-up, no weight decay, token masking). Perplexity: both final models "
        "scored by `trainer evaluate`, exp of the mean loss over every predicted token (MLM: "
        "BERT's 15% token masking, the same masks for both sides).",
        *load_warning(result["loads"]),
        "",
        *column_table(columns, rows),
        "",
        "The side's own figure: ours, its evaluation after training (MLM: with the recipe's "
        "whole-word masking); Trainer's, exp of its eval_loss, which for CLM "
        f"divides each block's summed loss by all {form.block} positions while "
        f"{form.block - 1} are predicted (measured: exactly {form.block - 1}/{form.block} of "
        "the token-mean loss), so it reads low; for MLM its masks are drawn afresh.",
        "",
        "| goal | met |",
        "|---|---|",
        *(f"| {goal} | {'yes' if met else 'no'} |" for goal, met in goals(runs)),
    ]
    return "\n".join(lines)
