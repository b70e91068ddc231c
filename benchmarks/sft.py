"""Supervised fine-tuning (issue 19): throughput of our sft task packed and unpacked against
TRL's SFTTrainer packed and unpacked, and what a tiny model learns on the shipped data with
full fine-tuning, LoRA and QLoRA.

Every throughput run trains the same tiny Llama built from config (random weights, a byte-level BPE
tokenizer trained on data/sft's turns, the engine's ChatML template, whose generation
markers TRL's `assistant_only_loss` needs) on data/sft/train.jsonl (chat rows, the loss on
the assistant turns only), each side in a fresh process.

1. **Throughput.** Four runs, interleaved (ours unpacked, TRL unpacked, ours packed, TRL
   packed), each way's fastest of `rounds` counting, with the same global batch,
   `max_length`, learning rate and number of steps, fp32, one process with a torch thread
   per core. TRL runs with its defaults otherwise, except two that would change the job:
   `bf16` (TRL turns it on by default; these CPUs emulate it) and `gradient_checkpointing`
   (on by default in TRL, off in our engine; it recomputes every forward pass), both off.
   TRL's packing is its default `bfd` strategy, which is padding-free (a batch is one row,
   the examples told apart by `position_ids`); ours packs `max_length` rows with a
   block-diagonal mask. Measured over every step but the first (warm-up): all real
   (non-padding) tokens/s, answer tokens/s, and the padding share (padding positions / all
   positions). TRL's tokens are counted in its collator's batches; our engine logs real
   tokens, answer tokens (`targets`) and the padding share per step.
2. **Quality.** configs/sft-{full,lora,qlora}.yaml as shipped but for the model, the data
   (packed), the budget and the learning rate (the recipes' are for a pretrained 0.5B
   model; a randomly initialised tiny one needs larger steps), on a Llama of
   `quality_layers` / `quality_hidden` built the same way. LoRA and QLoRA also train the
   embeddings and the output head in full (peft's `modules_to_save`): a random base's carry
   nothing, unlike a pretrained model's, and adapters over frozen random ones stay at the
   unigram loss (4.5 after 6 epochs, exact match 0, when tried). Then `trainer predict`
   (greedy) on the prompts of data/sft/pairs_validation.jsonl, each the user's turn and none
   of them in the training rows, before training (the random base) and after: exact match
   of the reference answer per rule and overall, and normalised contains (lower case,
   punctuation removed, the reference's words found in a row in the answer).

`--quick` uses a smaller budget (10 throughput steps, one round, 1 epoch of each method):
about 8 minutes on 2 idle cores. The full form (40 steps, 2 rounds, 5 epochs) about 20.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import engine
from benchmarks.common import (
    ROOT,
    fmt,
    load_warning,
    ratio,
    read_jsonl,
    run_measured,
    run_worker,
    steady_throughput,
    table,
)
from benchmarks.models import build_llama_chat, sft_corpus

TRAIN = ROOT / "data" / "sft" / "train.jsonl"
PROMPTS = ROOT / "data" / "sft" / "pairs_validation.jsonl"
RECIPES = {
    "full": ROOT / "configs" / "sft-full.yaml",
    "lora": ROOT / "configs" / "sft-lora.yaml",
    "qlora": ROOT / "configs" / "sft-qlora.yaml",
}
PACKING_GOAL = 1.3  # ours packed / ours unpacked, and ours packed / TRL packed, tokens/s


@dataclass(frozen=True)
class Form:
    """The models' sizes and each part's budget."""

    layers: int = 4  # the throughput model
    hidden: int = 256
    max_length: int = 128
    batch_size: int = 16
    steps: int = 40  # throughput: optimizer steps per run (the first is warm-up)
    rounds: int = 2  # throughput: each way's fastest round counts (bursts of other load)
    lr: float = 1e-3  # throughput
    quality_layers: int = 2  # the quality model (2 x 256 learns the rules; 4 x 128 did not)
    quality_hidden: int = 256
    full_lr: float = 1e-3
    lora_lr: float = 3e-3  # LoRA and QLoRA: adapters on a random base need larger steps
    epochs: int = 5  # quality: epochs of packed training per method
    prompts: int = 150  # quality: validation prompts answered
    max_new_tokens: int = 12
    train_rows: int = 0  # 0: all of data/sft/train.jsonl


FORMS = {
    False: Form(),
    True: Form(steps=10, rounds=1, epochs=1),
}


# --- the model and the data ----------------------------------------------------------------


def train_file(form: Form, work_dir: Path) -> Path:
    """data/sft/train.jsonl, or its first `train_rows` rows (a test's tiny form)."""
    if not form.train_rows:
        return TRAIN
    path = work_dir / "train.jsonl"
    path.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[: form.train_rows]))
    return path


def answer_share(model: Path, train: Path, max_length: int) -> dict[str, float]:
    """Tokens per row and the share of them that are answer tokens (targets), with our
    engine's encoding of the rows (truncation at max_length keeps the end, as it trains)."""
    from transformers import AutoTokenizer

    from trainer.data.chat_encode import row_tokens

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [row_tokens(tokenizer, row) for row in read_jsonl(train)]
    tokens = [min(len(r.ids), max_length) for r in rows]
    answers = [sum(r.trained[-max_length:]) for r in rows]
    return {
        "rows": len(rows),
        "tokens_per_row": statistics.fmean(tokens),
        "max_tokens": max(tokens),
        "answer_share": sum(answers) / sum(tokens),
    }


# --- throughput ----------------------------------------------------------------------------


def ours_throughput(
    model: Path, train: Path, form: Form, packing: bool, work_dir: Path
) -> dict[str, Any]:
    """`trainer train` (task sft) for `form.steps` steps, logging every step."""
    name = f"ours-{'packed' if packing else 'unpacked'}"
    settings = {
        "task": "sft",
        "model": {"name_or_path": str(model)},
        "data": {
            "train": str(train),
            "max_length": form.max_length,
            "packing": packing,
            "cache_dir": str(work_dir / "cache"),
        },
        "train": {
            "max_steps": form.steps,
            "global_batch_size": form.batch_size,
            "micro_batch_size": form.batch_size,
            "lr": form.lr,
            "warmup_ratio": 0.0,
            "precision": "no",
            "seed": 0,
        },
        "log": {"every_steps": 1, "trackers": []},
    }
    run = engine.train(work_dir / name, settings)
    windows = run.windows
    for window in windows:  # padding positions from the logged share
        window["positions"] = window["tokens"] / (1 - window["pad_fraction"])
        window["answers"] = window["targets"]
    return measures(windows, run.measured.wall_s, [w["loss"] for w in windows])


def trl_throughput(model: Path, train: Path, form: Form, packing: bool, work_dir: Path) -> dict:
    """TRL's SFTTrainer in a fresh process (the worker `trl_sft`, `trl_job` below)."""
    name = f"trl-{'packed' if packing else 'unpacked'}"
    spec = {
        "model": str(model),
        "train": str(train),
        "form": asdict(form),
        "packing": packing,
        "out_dir": str(work_dir / name),
    }
    measured, found = run_worker("trl_sft", spec, work_dir / f"{name}.log")
    return measures(found["windows"], measured.wall_s, found["losses"])


def measures(windows: list[dict], wall_s: float, losses: list[float]) -> dict[str, Any]:
    """Tokens/s, answer tokens/s and the padding share over every step but the first; the
    first and last losses (a check that both sides train on the same kind of target)."""
    timed = steady_throughput(windows)
    later = windows[1:]
    positions = sum(w["positions"] for w in later)
    return {
        "tokens_per_s": timed["tokens_per_s"],
        "answer_tokens_per_s": sum(w["answers"] for w in later) / timed["timed_s"],
        "pad_share": 1 - timed["timed_tokens"] / positions if positions else 0.0,
        "step_s": timed["step_s"],
        "timed_steps": timed["timed_steps"],
        "tokens_per_step": timed["timed_tokens"] / timed["timed_steps"],
        "wall_s": wall_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def trl_job(spec: dict) -> dict[str, Any]:
    """The worker: TRL's SFTTrainer on the rows, with TRL's defaults but for the settings
    the comparison pins (see the module docstring); per step: the time, and the real tokens,
    positions and answer tokens of the batch its collator made."""
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    from benchmarks.hf_reference import counted_training

    form, out_dir = Form(**spec["form"]), Path(spec["out_dir"])
    transformers.logging.set_verbosity_error()
    transformers.set_seed(0)
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=form.batch_size,
        max_steps=form.steps,
        learning_rate=form.lr,
        max_length=form.max_length,
        packing=spec["packing"],
        assistant_only_loss=True,  # the loss on the answers only, as ours
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    trainer = SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(spec["model"]),
        args=args,
        train_dataset=datasets.Dataset.from_list(read_jsonl(Path(spec["train"]))),
        processing_class=transformers.AutoTokenizer.from_pretrained(spec["model"]),
    )

    def count(batch) -> dict[str, int]:
        mask = batch.get("attention_mask")
        positions = batch["input_ids"].numel()
        real = int(mask.sum()) if mask is not None else positions  # padding-free: no padding
        answers = int((batch["labels"][:, 1:] != -100).sum())
        return {"tokens": real, "positions": positions, "answers": answers}

    return counted_training(trainer, count)


# --- quality -------------------------------------------------------------------------------


def normalised(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def scores(answers: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after stripping surrounding spaces) and normalised contains (the
    reference's words, in a row, among the answer's words)."""
    exact = [a.strip() == r.strip() for a, r in zip(answers, references, strict=True)]
    contains = [
        f" {normalised(r)} " in f" {normalised(a)} "
        for a, r in zip(answers, references, strict=True)
    ]
    return {"exact_match": statistics.fmean(exact), "contains": statistics.fmean(contains)}


def by_rule(prompts: list[dict], answers: list[str]) -> dict[str, float]:
    """Exact match per rule (the word before the prompt's colon)."""
    found: dict[str, list[bool]] = {}
    for prompt, answer in zip(prompts, answers, strict=True):
        rule = prompt["prompt"].split(":", 1)[0]
        found.setdefault(rule, []).append(answer.strip() == prompt["completion"].strip())
    return {rule: statistics.fmean(hits) for rule, hits in sorted(found.items())}


def predict(model_dir: Path, prompts: list[dict], form: Form, log: Path, *extra: str) -> dict:
    """`trainer predict` (greedy) on the prompts; the answers scored, and a few kept."""
    inputs = log.with_suffix(".in.jsonl")
    inputs.write_text(
        "".join(json.dumps({"id": i, "text": p["prompt"]}) + "\n" for i, p in enumerate(prompts))
    )
    output = log.with_suffix(".out.jsonl")
    command = engine.trainer_command(
        "predict",
        str(model_dir),
        "--input",
        str(inputs),
        "--output",
        str(output),
        "--max-new-tokens",
        str(form.max_new_tokens),
        "--batch-size",
        "50",
        *extra,
    )
    run_measured(command, log)
    answers = [row["generated"] for row in read_jsonl(output)]
    found = scores(answers, [p["completion"] for p in prompts])
    found["by_rule"] = by_rule(prompts, answers)
    found["samples"] = [
        {"prompt": p["prompt"], "reference": p["completion"], "answer": a}
        for p, a in zip(prompts[:3], answers[:3], strict=True)
    ]
    return found


def trained(method: str, model: Path, train: Path, form: Form, work_dir: Path) -> dict:
    """One recipe, packed, at the form's budget; its final/ answers the prompts."""
    lr = form.full_lr if method == "full" else form.lora_lr
    settings = {
        "model": {"name_or_path": str(model)},
        "data": {
            "train": str(train),
            "validation": None,
            "max_length": form.max_length,
            "packing": True,
            "cache_dir": str(work_dir / "cache"),
        },
        "train": {
            "epochs": form.epochs,
            "global_batch_size": form.batch_size,
            "micro_batch_size": form.batch_size,
            "lr": lr,
            "seed": 0,
        },
        "log": {"every_steps": 10, "trackers": []},
    }
    if method != "full":  # a random base's embeddings and head train in full (see above)
        settings["peft"] = {"options": {"modules_to_save": ["embed_tokens", "lm_head"]}}
    run = engine.train(work_dir / f"quality-{method}", settings, RECIPES[method])
    summary = run.read("run_summary.json")
    return {
        "lr": lr,
        "steps": run.windows[-1]["step"],
        "train_s": run.windows[-1]["elapsed_s"],
        "last_loss": run.windows[-1]["loss"],
        "trainable_parameters": summary["trainable_parameters"],
        "parameters": summary["parameters"],
    }


def quality(model: Path, train: Path, form: Form, work_dir: Path) -> dict[str, Any]:
    """The random base's answers, then each method's after training."""
    prompts = read_jsonl(PROMPTS)[: form.prompts]
    before = predict(model, prompts, form, work_dir / "predict-before.log", "task=sft")
    methods = {}
    for method in RECIPES:
        print(f"[sft] quality: {method} ...", flush=True)
        found = trained(method, model, train, form, work_dir)
        final = work_dir / f"quality-{method}" / "final"
        found["after"] = predict(final, prompts, form, work_dir / f"predict-{method}.log")
        methods[method] = found
    return {"prompts": len(prompts), "before": before, "methods": methods}


# --- the section ---------------------------------------------------------------------------

WAYS = (("ours", False), ("TRL", False), ("ours", True), ("TRL", True))


def run(quick: bool, work_dir: Path, form: Form | None = None) -> dict[str, Any]:
    """The models, the throughput runs (interleaved, so that a change of background load
    falls on both sides), then the quality runs."""
    form = form or FORMS[quick]
    train = train_file(form, work_dir)
    corpus = sft_corpus(TRAIN)
    model = build_llama_chat(work_dir / "model", corpus, form.layers, form.hidden)
    data = answer_share(model, train, form.max_length)
    runs: dict[str, dict] = {}
    loads = []
    for round_ in range(form.rounds):
        for side, packing in WAYS:
            way = f"{side} {'packed' if packing else 'unpacked'}"
            print(f"[sft] throughput, round {round_ + 1}: {way} ...", flush=True)
            loads.append(os.getloadavg()[0])
            if side == "ours":
                found = ours_throughput(model, train, form, packing, work_dir)
            else:
                found = trl_throughput(model, train, form, packing, work_dir)
            rounds = [*runs.get(way, {}).get("rounds_tokens_per_s", []), found["tokens_per_s"]]
            if way not in runs or found["tokens_per_s"] > runs[way]["tokens_per_s"]:
                runs[way] = found
            runs[way]["rounds_tokens_per_s"] = rounds
    small = (form.quality_layers, form.quality_hidden)
    if small != (form.layers, form.hidden):
        model = build_llama_chat(work_dir / "quality-model", corpus, *small)
    result = {"form": asdict(form), "data": data, "throughput": runs}
    result["quality"] = quality(model, train, form, work_dir)
    result["loads"] = [*loads, os.getloadavg()[0]]
    return result


# --- the results ---------------------------------------------------------------------------


def ratios(runs: dict[str, dict]) -> list[tuple[str, float | None, float | None]]:
    """Each comparison: its name, the ratio of all tokens/s and of answer tokens/s."""
    pairs = (
        ("ours packed / ours unpacked", "ours packed", "ours unpacked"),
        ("TRL packed / TRL unpacked", "TRL packed", "TRL unpacked"),
        ("ours unpacked / TRL unpacked", "ours unpacked", "TRL unpacked"),
        ("ours packed / TRL packed", "ours packed", "TRL packed"),
        ("ours packed / TRL unpacked", "ours packed", "TRL unpacked"),
    )
    return [
        (
            name,
            *(ratio(runs[a][key], runs[b][key]) for key in ("tokens_per_s", "answer_tokens_per_s")),
        )
        for name, a, b in pairs
    ]


def goals(result: dict[str, Any]) -> list[tuple[str, float | None, bool | None]]:
    """The issue's throughput goals: packing ≥ 1.3x unpacked, and ours packed ≥ 1.3x TRL
    packed (tokens/s)."""
    found = {name: tokens for name, tokens, _ in ratios(result["throughput"])}
    return [
        (
            f"sft {name} ≥ {PACKING_GOAL}× (tokens/s)",
            found[name],
            None if found[name] is None else found[name] >= PACKING_GOAL,
        )
        for name in ("ours packed / ours unpacked", "ours packed / TRL packed")
    ]


def _code(text: str) -> str:
    """A model's text as inline code on one line of a Markdown table's neighbourhood."""
    return "`" + " ".join(text.replace("`", "'").replace("|", "/").split()) + "`"


def _quality_rows(quality_: dict) -> list[list[str]]:
    before = quality_["before"]
    rows = []
    for method, found in quality_["methods"].items():
        after = found["after"]
        rows.append(
            [
                method,
                f"{found['lr']:g}",
                str(found["steps"]),
                f"{found['trainable_parameters']:,}",
                fmt(found["last_loss"], 3),
                fmt(before["exact_match"], 3),
                fmt(after["exact_match"], 3),
                fmt(before["contains"], 3),
                fmt(after["contains"], 3),
            ]
        )
    return rows


def _rule_table(quality_: dict) -> list[str]:
    """Exact match per rule: the random base, then each method after training."""
    answered = {"before": quality_["before"]} | {
        f"{method} after": found["after"] for method, found in quality_["methods"].items()
    }
    rules = list(quality_["before"]["by_rule"])
    rows = [
        [name, *(fmt(found["by_rule"][r], 2) for r in rules)] for name, found in answered.items()
    ]
    return table(["exact match", *rules], rows)


def markdown(result: dict[str, Any]) -> str:
    """Settings, the throughput runs and their ratios, the goals, then the quality table."""
    form, data, runs = Form(**result["form"]), result["data"], result["throughput"]
    head = [
        "run",
        "tokens/s",
        "answer tokens/s",
        "padding share",
        "step (s)",
        "tokens per step",
        "loss: first → last",
        "run wall (s)",
    ]
    rows = [
        [
            way,
            fmt(r["tokens_per_s"], 0),
            fmt(r["answer_tokens_per_s"], 1),
            fmt(r["pad_share"], 3),
            fmt(r["step_s"], 3),
            fmt(r["tokens_per_step"], 0),
            f"{r['first_loss']:.3f} → {r['last_loss']:.3f}",
            fmt(r["wall_s"], 0),
        ]
        for way, r in runs.items()
    ]
    quality_ = result["quality"]
    samples = quality_["methods"]["full"]["after"]["samples"]
    lines = [
        "## Supervised fine-tuning: ours vs TRL's SFTTrainer, packed and unpacked; "
        "full / LoRA / QLoRA",
        "",
        f"A random Llama built from config ({form.layers} layers, hidden {form.hidden}), "
        f"data/sft/train.jsonl ({data['rows']} chat rows, {data['tokens_per_row']:.1f} tokens "
        f"per row, at most {data['max_tokens']}; answer share {data['answer_share']:.3f}); "
        f"global batch {form.batch_size}, max_length {form.max_length}, {form.steps} steps "
        f"(the first is warm-up, not timed), lr {form.lr:g}, fp32, one process; the fastest "
        f"of {form.rounds} round(s) per run, the runs interleaved. TRL: its "
        "defaults but for bf16 and gradient checkpointing (both off, as ours), "
        "`assistant_only_loss=True`, packing with its default `bfd` (padding-free). Answer "
        "tokens counted on both sides.",
        *load_warning(result["loads"]),
        "",
        *table(head, rows),
        "",
        *table(
            ["ratio", "tokens/s", "answer tokens/s"],
            [[n, fmt(t, 2), fmt(a, 2)] for n, t, a in ratios(runs)],
        ),
        "",
        "| goal | measured | met |",
        "|---|---|---|",
        *(
            f"| {g} | {fmt(v, 2)}× | {'n/a' if m is None else 'yes' if m else 'no'} |"
            for g, v, m in goals(result)
        ),
        "",
        f"Quality: configs/sft-{{full,lora,qlora}}.yaml on a random {form.quality_layers}-layer "
        f"Llama (hidden {form.quality_hidden}), {form.epochs} epochs of packed rows, global "
        f"batch {form.batch_size}; greedy answers (`trainer predict`, {form.max_new_tokens} new "
        f"tokens) to {quality_['prompts']} prompts of data/sft/pairs_validation.jsonl (none in "
        "the training rows), before training (the random base, the same for every method) and "
        "after. LoRA and QLoRA (r 16, every linear layer) also train the random embeddings and "
        "output head in full (`modules_to_save`): a random base's carry nothing a pretrained "
        "model's would.",
        "",
        *table(
            [
                "method",
                "lr",
                "steps",
                "trainable parameters",
                "last train loss",
                "exact match before",
                "exact match after",
                "contains before",
                "contains after",
            ],
            _quality_rows(quality_),
        ),
        "",
        *_rule_table(quality_),
        "",
        "Full fine-tuning's first answers: "
        + "; ".join(
            f"{_code(s['prompt'])} → {_code(s['answer'])} (reference {_code(s['reference'])})"
            for s in samples
        ),
    ]
    return "\n".join(lines)
