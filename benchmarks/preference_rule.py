"""Preference tuning after supervised fine-tuning (issue 20) on the rule data: the reward
accuracy on held-out pairs, and whether greedy answers follow the rule more often after
DPO than after SFT alone.

    python -m benchmarks.run --only preference [--quick]

1. **The model**: a random Llama built from config (benchmarks/models.py's
   build_llama_chat: `layers` x `hidden`, a byte-level BPE tokenizer trained on data/sft's
   turns, ChatML).
2. **SFT**: configs/sft-full.yaml on data/sft/train.jsonl (8,000 conversations, packed),
   lr 1e-3, for each of `sft_epochs`: a short run that leaves errors for DPO to fix, and a
   longer one.
3. **DPO** from each SFT model's final/, in full with the reference scored once before
   training (`preference.precompute_reference`), on data/preference/train.jsonl (1,000
   pairs: the chosen answer applies the rule named, the rejected one another rule to the
   same words), beta 0.1, lr `dpo_lr`, `dpo_epochs` epochs; once plain and once with
   `preference.sft_weight` (RPO's NLL term on the chosen answer).
4. **Scores** on data/preference/validation.jsonl's 200 held-out pairs, whose prompts no
   training row of either file asks: the reward accuracy and margin of the last evaluation
   (the policy against its SFT start), and greedy answers (`trainer predict`, the prompt as
   the user's turn) of the random base, each SFT model and each DPO model: exact match of
   the chosen answer, overall and per rule.

`--quick` runs only the short SFT: about 3 minutes on 2 idle cores; the full form about 8.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
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
    sft_epochs: tuple[int, ...] = (2, 5)
    sft_lr: float = 1e-3
    dpo_epochs: int = 4
    dpo_lr: float = 1e-4
    beta: float = 0.1
    sft_weights: tuple[float, ...] = (0.0, 1.0)
    max_length: int = 128
    batch_size: int = 16
    train_rows: int = 0  # 0: every row of both training files (else their first rows)
    prompts: int = 0  # held-out pairs scored; 0: all


FORMS = {False: Form(), True: Form(sft_epochs=(2,))}


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


def sft_stage(model: Path, epochs: int, form: Form, work_dir: Path) -> Path:
    """configs/sft-full.yaml for `epochs` epochs; its final/."""
    settings = {
        "model": {"name_or_path": str(model)},
        "data": {
            "train": str(head(SFT_TRAIN, form, work_dir)),
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
    run = engine.train(work_dir / f"sft-{epochs}", settings, sft.RECIPES["full"])
    return run.run_dir / "final"


def dpo_stage(start: Path, weight: float, form: Form, work_dir: Path, name: str) -> dict:
    """DPO in full from `start`, the reference precomputed; the last evaluation's rewards."""
    settings = {
        "task": "preference",
        "model": {"name_or_path": str(start)},
        "data": {
            "train": str(head(DATA / "train.jsonl", form, work_dir)),
            "validation": str(DATA / "validation.jsonl"),
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
    answers = sft.Form(max_new_tokens=12)

    def greedy(folder: Path, name: str, *extra: str) -> dict:
        found = sft.predict(folder, prompts, answers, work_dir / f"predict-{name}.log", *extra)
        return {k: found[k] for k in ("exact_match", "contains", "by_rule")}

    result: dict[str, Any] = {"form": asdict(form), "prompts": len(prompts)}
    result["base"] = greedy(model, "base", "task=sft")
    stages = []
    for epochs in form.sft_epochs:
        print(f"[preference] sft, {epochs} epoch(s) ...", flush=True)
        final = sft_stage(model, epochs, form, work_dir)
        stage: dict[str, Any] = {"sft_epochs": epochs, "sft": greedy(final, f"sft-{epochs}")}
        stage["dpo"] = []
        for weight in form.sft_weights:
            name = f"dpo-{epochs}-{weight:g}"
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
            *(fmt(found["by_rule"][r], 2) for r in rules),
        ]

    rows = [row("random base", ("", ""), result["base"])]
    for stage in result["stages"]:
        epochs = stage["sft_epochs"]
        rows.append(row(f"SFT {epochs} epoch(s)", ("", ""), stage["sft"]))
        for dpo in stage["dpo"]:
            name = f"SFT {epochs} + DPO" + (
                f" + NLL x{dpo['sft_weight']:g}" if dpo["sft_weight"] else ""
            )
            rewards = (fmt(dpo["reward_accuracy"], 3), fmt(dpo["reward_margin"], 2))
            rows.append(row(name, rewards, dpo["after"]))
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The settings, then one table: every model's held-out rewards and greedy answers."""
    form = result["form"]
    rules = list(result["base"]["by_rule"])
    head_ = ["model", "reward accuracy", "reward margin", "exact match", *rules]
    return "\n".join(
        [
            "## Preference tuning after SFT: held-out rewards and greedy answers",
            "",
            f"A random {form['layers']}-layer Llama (hidden {form['hidden']}); SFT: "
            f"configs/sft-full.yaml on data/sft/train.jsonl, packed, lr {form['sft_lr']:g}; DPO "
            f"in full from each SFT model, the reference its start (precomputed), beta "
            f"{form['beta']:g}, lr {form['dpo_lr']:g}, {form['dpo_epochs']} epochs of "
            f"data/preference/train.jsonl, plain or with `preference.sft_weight` (RPO's NLL "
            f"term). Scored on the {result['prompts']} held-out pairs of "
            "data/preference/validation.jsonl (prompts no training row asks): the last "
            "evaluation's reward accuracy and margin, and exact match of greedy answers "
            "(`trainer predict`, 12 new tokens) with the chosen answer, overall and per rule.",
            "",
            *table(head_, _rows(result)),
        ]
    )
