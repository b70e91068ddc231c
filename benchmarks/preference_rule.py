"""Preference tuning after supervised fine-tuning (issue 20) on the rule data: the reward
accuracy on held-out pairs, and whether greedy answers follow the rule more often after
DPO than after SFT alone.

    python -m benchmarks.run --only preference [--quick]

1. **The model**: a random Llama built from config (benchmarks/models.py's
   build_llama_chat: `layers` x `hidden`, a byte-level BPE tokenizer trained on data/sft's
   turns, ChatML).
2. **SFT**: configs/sft-full.yaml (packed, lr 1e-3) for each stage's epochs, on one of two
   sets of demonstrations:
   - `clean`: data/sft/train.jsonl (8,000 conversations), every answer the result only;
   - `pleasantries`: the same conversations, half of whose answers start with the
     pleasantry the instruction rules out (data/preference/make_pairs.py's
     `with_pleasantries`, seeded): demonstrations of which only some follow the rule, the
     case preference tuning is for.
3. **DPO** from each SFT model's final/, in full with the reference scored once before
   training (`preference.precompute_reference`), on data/preference/train.jsonl (1,000
   pairs: the chosen answer is the named rule's result only; the rejected one another
   rule's, or the right result after the pleasantry), every pair as chat turns, the form
   the SFT model answers in (a plain-text pair is not a conversation it was taught);
   beta 0.1, lr `dpo_lr`, `dpo_epochs` epochs; once plain and once with
   `preference.sft_weight` (RPO's NLL term on the chosen answer).
4. **Scores** on data/preference/validation.jsonl's 200 held-out pairs, whose prompts no
   training row of either file asks: the reward accuracy and margin of the last evaluation
   (the policy against its SFT start), and greedy answers (`trainer predict`, the prompt as
   the user's turn) of the random base, each SFT model and each DPO model: exact match of
   the chosen answer (the rule's result only), overall and per rule, and normalised
   contains (the result anywhere in the answer: the rule applied, with or without the
   pleasantry).

`--quick` runs only the 2-epoch SFT on the pleasantries: about 4 minutes on 2 idle cores;
the full form (clean and pleasantries, 2 and 5 epochs each) about 25.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import engine, sft
from benchmarks.common import ROOT, fmt, read_jsonl, table
from benchmarks.models import build_llama_chat, sft_corpus

DATA = ROOT / "data" / "preference"
SFT_TRAIN = ROOT / "data" / "sft" / "train.jsonl"


@dataclass(frozen=True)
class Form:
    """The model, the two stages' budgets and the DPO variants."""

    layers: int = 2
    hidden: int = 256
    # (the SFT demonstrations, epochs) of each stage: `clean` or `pleasantries`
    stages: tuple[tuple[str, int], ...] = (
        ("clean", 2),
        ("clean", 5),
        ("pleasantries", 2),
        ("pleasantries", 5),
    )
    sft_lr: float = 1e-3
    dpo_epochs: int = 4
    dpo_lr: float = 1e-4
    beta: float = 0.1
    sft_weights: tuple[float, ...] = (0.0, 1.0)
    max_length: int = 128
    batch_size: int = 16
    train_rows: int = 0  # 0: every row of both training files (else their first rows)
    prompts: int = 0  # held-out pairs scored; 0: all


FORMS = {False: Form(), True: Form(stages=(("pleasantries", 2),))}
SOURCES = ("clean", "pleasantries")
NEW_TOKENS = 32


def make_pairs() -> ModuleType:
    """data/preference/make_pairs.py, where the pleasantry is defined (a script beside its
    data, not a package)."""
    spec = importlib.util.spec_from_file_location("make_pairs", DATA / "make_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demonstrations(source: str, form: Form, work_dir: Path) -> Path:
    """The SFT rows of `source` (the form's first `train_rows` of them, if set)."""
    clean = head(SFT_TRAIN, form, work_dir)
    if source == "clean":
        return clean
    rows = [json.loads(line) for line in clean.read_text().splitlines()]
    path = work_dir / "sft-pleasantries.jsonl"
    changed = make_pairs().with_pleasantries(rows, random.Random(0))
    path.write_text("".join(json.dumps(row) + "\n" for row in changed))
    return path


def as_chat(row: dict) -> dict:
    """A pair as chat turns: the prompt the user's, each answer the assistant's."""
    if not isinstance(row["prompt"], str):
        return row
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        **{k: [{"role": "assistant", "content": row[k].strip()}] for k in ("chosen", "rejected")},
    }


def chat_pairs(name: str, form: Form, work_dir: Path) -> Path:
    """data/preference/`name` (train: its first `train_rows` pairs, if set) as chat turns."""
    path = head(DATA / name, form, work_dir) if name == "train.jsonl" else DATA / name
    out = work_dir / f"pairs-{name}"
    out.write_text("".join(json.dumps(as_chat(row)) + "\n" for row in read_jsonl(path)))
    return out


def pair_texts() -> list[str]:
    """Every prompt and answer of the training pairs, as text."""
    texts = []
    for row in read_jsonl(DATA / "train.jsonl"):
        for key in ("prompt", "chosen", "rejected"):
            value = row[key]
            texts.append(value if isinstance(value, str) else " ".join(t["content"] for t in value))
    return texts


def _text(value: str | list[dict]) -> str:
    """A prompt's or answer's text: the string, or the last turn's content."""
    return value if isinstance(value, str) else value[-1]["content"]


def held_out(form: Form) -> list[dict]:
    """The held-out pairs as sft.predict's prompts: the question and the chosen answer."""
    rows = read_jsonl(DATA / "validation.jsonl")[: form.prompts or None]
    return [{"prompt": _text(r["prompt"]), "completion": _text(r["chosen"]).strip()} for r in rows]


def head(source: Path, form: Form, work_dir: Path) -> Path:
    """`source`, or its first `train_rows` rows (a test's tiny form)."""
    if not form.train_rows:
        return source
    path = work_dir / f"{source.parent.name}-{source.name}"
    path.write_text("".join(source.read_text().splitlines(keepends=True)[: form.train_rows]))
    return path


def sft_stage(model: Path, source: str, epochs: int, form: Form, work_dir: Path) -> Path:
    """configs/sft-full.yaml on `source`'s demonstrations for `epochs` epochs; its final/."""
    settings = {
        "model": {"name_or_path": str(model)},
        "data": {
            "train": str(demonstrations(source, form, work_dir)),
            "validation": None,
            "max_length": form.max_length,
            "packing": True,
            "cache_dir": str(work_dir / "cache"),
        },
        "train": {
            "epochs": epochs,
            "global_batch_size": form.batch_size,
            "micro_batch_size": form.batch_size,
            "lr": form.sft_lr,
            "seed": 0,
        },
        "log": {"every_steps": 10, "trackers": []},
    }
    run = engine.train(work_dir / f"sft-{source}-{epochs}", settings, sft.RECIPES["full"])
    return run.run_dir / "final"


def dpo_stage(start: Path, weight: float, form: Form, work_dir: Path, name: str) -> dict:
    """DPO in full from `start`, the reference precomputed; the last evaluation's rewards."""
    settings = {
        "task": "preference",
        "model": {"name_or_path": str(start)},
        "data": {
            "train": str(chat_pairs("train.jsonl", form, work_dir)),
            "validation": str(chat_pairs("validation.jsonl", form, work_dir)),
            "max_length": form.max_length,
            "cache_dir": str(work_dir / "cache"),
        },
        "preference": {"beta": form.beta, "precompute_reference": True, "sft_weight": weight},
        "train": {
            "epochs": form.dpo_epochs,
            "global_batch_size": form.batch_size,
            "micro_batch_size": form.batch_size,
            "lr": form.dpo_lr,
            "warmup_ratio": 0.05,
            "seed": 0,
        },
        "log": {"every_steps": 20, "trackers": []},
    }
    run = engine.train(work_dir / name, settings)
    last = [r for r in run.records if "eval_rewards/accuracy" in r][-1]
    return {
        "sft_weight": weight,
        "steps": run.windows[-1]["step"],
        "reward_accuracy": last["eval_rewards/accuracy"],
        "reward_margin": last["eval_rewards/margin"],
        "final": str(run.run_dir / "final"),
    }


def run(quick: bool, work_dir: Path, form: Form | None = None) -> dict[str, Any]:
    """The base's answers; then per SFT length its answers and, per DPO variant, the
    rewards and answers after DPO."""
    form = form or FORMS[quick]
    prompts = held_out(form)
    model = build_llama_chat(work_dir / "model", sft_corpus(SFT_TRAIN), form.layers, form.hidden)
    # room for the pleasantry and a five-word result: its characters are rare in the text
    # the tokenizer was trained on, so it takes about 12 tokens alone
    answers = sft.Form(max_new_tokens=NEW_TOKENS)

    def greedy(folder: Path, name: str, *extra: str) -> dict:
        found = sft.predict(folder, prompts, answers, work_dir / f"predict-{name}.log", *extra)
        return {k: found[k] for k in ("exact_match", "contains", "by_rule")}

    result: dict[str, Any] = {"form": asdict(form), "prompts": len(prompts)}
    result["new_tokens"] = NEW_TOKENS
    result["base"] = greedy(model, "base", "task=sft")
    stages = []
    for source, epochs in form.stages:
        print(f"[preference] sft on {source}, {epochs} epoch(s) ...", flush=True)
        final = sft_stage(model, source, epochs, form, work_dir)
        stage: dict[str, Any] = {"source": source, "sft_epochs": epochs}
        stage["sft"] = greedy(final, f"sft-{source}-{epochs}")
        stage["dpo"] = []
        for weight in form.sft_weights:
            name = f"dpo-{source}-{epochs}-{weight:g}"
            print(f"[preference] {name} ...", flush=True)
            found = dpo_stage(final, weight, form, work_dir, name)
            found["after"] = greedy(Path(found.pop("final")), name)
            stage["dpo"].append(found)
        stages.append(stage)
    result["stages"] = stages
    return result


def _rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per model: what trained it, its rewards (DPO), exact match overall and per
    rule."""
    rules = list(result["base"]["by_rule"])

    def row(name: str, rewards: tuple[str, str], found: dict) -> list[str]:
        return [
            name,
            *rewards,
            fmt(found["exact_match"], 3),
            fmt(found["contains"], 3),
            *(fmt(found["by_rule"][r], 2) for r in rules),
        ]

    rows = [row("random base", ("", ""), result["base"])]
    for stage in result["stages"]:
        sft_name = f"SFT {stage['source']} {stage['sft_epochs']}"
        rows.append(row(f"{sft_name} epoch(s)", ("", ""), stage["sft"]))
        for dpo in stage["dpo"]:
            name = f"{sft_name} + DPO" + (
                f" + NLL x{dpo['sft_weight']:g}" if dpo["sft_weight"] else ""
            )
            rewards = (fmt(dpo["reward_accuracy"], 3), fmt(dpo["reward_margin"], 2))
            rows.append(row(name, rewards, dpo["after"]))
    return rows


def goals(result: dict[str, Any]) -> list[tuple[str, bool]]:
    """The issue's two checks, per DPO run: held-out reward accuracy above 0.9, and greedy
    answers following the rule (exact match) more often than after its SFT alone."""
    found = []
    for stage in result["stages"]:
        before = stage["sft"]["exact_match"]
        for dpo in stage["dpo"]:
            name = f"SFT {stage['source']} {stage['sft_epochs']} + DPO" + (
                f" + NLL x{dpo['sft_weight']:g}" if dpo["sft_weight"] else ""
            )
            after = dpo["after"]["exact_match"]
            found.append((f"{name}: reward accuracy > 0.9", dpo["reward_accuracy"] > 0.9))
            found.append((f"{name}: exact match {before:.3f} → {after:.3f}", after > before))
    return found


def markdown(result: dict[str, Any]) -> str:
    """The settings, one table of every model's held-out rewards and greedy answers, then
    the goals."""
    form = result["form"]
    rules = list(result["base"]["by_rule"])
    head_ = ["model", "reward accuracy", "reward margin", "exact match", "contains", *rules]
    return "\n".join(
        [
            "## Preference tuning after SFT: held-out rewards and greedy answers",
            "",
            f"A random {form['layers']}-layer Llama (hidden {form['hidden']}); SFT: "
            f"configs/sft-full.yaml, packed, lr {form['sft_lr']:g}, on data/sft/train.jsonl "
            "(clean) or on the same conversations with half the answers after the "
            "pleasantry 'Sure! The answer is: ' (pleasantries); DPO in full from each SFT "
            "model, the reference its start (precomputed), beta "
            f"{form['beta']:g}, lr {form['dpo_lr']:g}, {form['dpo_epochs']} epochs of "
            "data/preference/train.jsonl as chat turns, plain or with "
            "`preference.sft_weight` (RPO's NLL term). Scored on the "
            f"{result['prompts']} held-out pairs of data/preference/validation.jsonl (prompts "
            "no training row asks): the last evaluation's reward accuracy and margin, and "
            f"greedy answers (`trainer predict`, {result['new_tokens']} new tokens): "
            "exact match of the chosen "
            "answer overall and per rule, and contains (the result anywhere in the answer).",
            "",
            *table(head_, _rows(result)),
            "",
            *table(["goal", "met"], [[g, "yes" if met else "no"] for g, met in goals(result)]),
        ]
    )
