"""Preference tuning (issue 20): DPO throughput of our preference task against TRL's
DPOTrainer, side by side, with LoRA (the reference is the policy with its adapter off, on
both sides) and in full (a frozen copy of the initial model as the reference, which is what
TRL does by default; ours with `preference.precompute_reference: false`), and both sides'
full fine-tuning again with the reference's scores computed once before training
(ours `precompute_reference: true`, TRL `precompute_ref_log_probs=True`).

Every run trains the same tiny Llama built from config (random weights, a byte-level BPE
tokenizer trained on the pairs' own text, the engine's ChatML template) on the same pairs,
data/preference/train.jsonl (half plain text, half chat messages), each side in a fresh
process, with the same beta, global batch (pairs), `max_length`, learning rate, linear
decay without warm-up, no weight decay, clipping at 1.0, number of steps, fp32, one
process with a torch thread per core. LoRA: rank 8, alpha 16, no dropout, every linear
layer. The runs are interleaved (so that a change of background load falls on both sides)
and each way's fastest of `rounds` counts.

TRL runs with its defaults otherwise, except those that would change the job:
- `bf16` off (TRL turns it on by default; these CPUs emulate it);
- `gradient_checkpointing` off (on by default in TRL, off in our engine; it recomputes
  every forward pass);
- `learning_rate` and `max_length` (TRL's defaults 1e-6 and 1024) set to the form's;
- `weight_decay`, `max_grad_norm`, `beta`, `loss_type` are TRL's defaults (0, 1, 0.1,
  sigmoid) and ours are pinned to them.
TRL's Arrow dataset cannot hold a column of both strings and message lists, so its own
`_prepare_dataset` (its tokenization, EOS and chat template) runs on the text rows and the
chat rows apart and the two are put back in file order (`mixed_rows_trainer`); training is
TRL's unchanged. Both sides then train on the same token ids in the same seeded batches
(tests/test_benchmark_dpo.py). Their log-probabilities differ on chat rows by one token:
TRL scores everything after the prompt, the template's newline after `<|im_end|>`
included, ours the assistant's tokens only; so the losses agree at the first step (log 2)
and drift apart slightly after. The forward and backward passes cover the same tokens.

Tokens are counted the same way on both sides: the real (non-padding) tokens of the chosen
and the rejected sequences of each step, prompt tokens included (our engine logs them per
step from the attention mask; TRL's are counted in its collator's batches), over every step
but the first (warm-up). Peak RSS is each run's own process (common.run_measured).

`--quick`: 10 steps, one round (a few minutes on 2 idle cores); the full form 40 steps, 2
rounds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import engine
from benchmarks.common import (
    ROOT,
    Measured,
    fmt,
    load_warning,
    ratio,
    read_jsonl,
    run_worker,
    steady_throughput,
    table,
)
from benchmarks.models import build_llama_chat
from benchmarks.preference_rule import pair_texts

TRAIN = ROOT / "data" / "preference" / "train.jsonl"


@dataclass(frozen=True)
class Form:
    """The model's size and the runs' budget."""

    layers: int = 4
    hidden: int = 256
    max_length: int = 128  # above the longest pair: neither side truncates
    batch_size: int = 16  # pairs per optimizer step (32 sequences)
    steps: int = 40  # optimizer steps per run (the first is warm-up)
    rounds: int = 2  # each way's fastest round counts (bursts of other load)
    lr: float = 1e-4
    beta: float = 0.1
    lora_r: int = 8
    lora_alpha: float = 16.0
    train_rows: int = 0  # 0: all of data/preference/train.jsonl


FORMS = {False: Form(), True: Form(steps=10, rounds=1)}


@dataclass(frozen=True)
class Way:
    """One kind of run: whose trainer, LoRA or full, and whether the reference's scores
    are precomputed."""

    side: str  # "ours" | "TRL"
    method: str  # "lora" | "full"
    precompute: bool = False

    @property
    def name(self) -> str:
        """The run's name in the tables."""
        return f"{self.side} {'LoRA' if self.method == 'lora' else 'full'}" + (
            ", precomputed reference" if self.precompute else ""
        )

    @property
    def folder(self) -> str:
        """The run's folder and log name."""
        return self.name.replace(",", "").replace(" ", "-")


WAYS = (
    Way("ours", "lora"),
    Way("TRL", "lora"),
    Way("ours", "full"),
    Way("TRL", "full"),
    Way("ours", "full", True),
    Way("TRL", "full", True),
)
# the ratios reported: (name, numerator way, denominator way)
RATIOS = (
    ("LoRA: ours / TRL", "ours LoRA", "TRL LoRA"),
    ("full: ours / TRL", "ours full", "TRL full"),
    (
        "full, precomputed reference: ours / TRL",
        "ours full, precomputed reference",
        "TRL full, precomputed reference",
    ),
    ("ours: precomputed / frozen copy", "ours full, precomputed reference", "ours full"),
)


# --- the model and the data ----------------------------------------------------------------


def train_file(form: Form, work_dir: Path) -> Path:
    """data/preference/train.jsonl, or its first `train_rows` rows (a test's tiny form)."""
    if not form.train_rows:
        return TRAIN
    path = work_dir / "train.jsonl"
    path.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[: form.train_rows]))
    return path


def pair_lengths(model: Path, train: Path) -> dict[str, Any]:
    """Pairs, chat rows among them, and tokens per sequence (prompt and answer) as our
    engine encodes them: what `max_length` must hold for neither side to truncate."""
    from transformers import AutoTokenizer

    from trainer.data.preference_encode import pair_tokens

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = read_jsonl(train)
    lengths = [len(side.ids) for row in rows for side in pair_tokens(tokenizer, row)]
    return {
        "pairs": len(rows),
        "chat_pairs": sum(isinstance(row["prompt"], list) for row in rows),
        "tokens_per_sequence": sum(lengths) / len(lengths),
        "max_tokens": max(lengths),
    }


# --- our side ------------------------------------------------------------------------------


def ours_settings(model: Path, train: Path, form: Form, way: Way, work_dir: Path) -> dict:
    """`trainer train` settings of one way, every one the comparison depends on pinned."""
    settings: dict[str, Any] = {
        "task": "preference",
        "model": {"name_or_path": str(model)},
        "data": {
            "train": str(train),
            "max_length": form.max_length,
            "cache_dir": str(work_dir / "cache"),
        },
        "train": {
            "max_steps": form.steps,
            "global_batch_size": form.batch_size,
            "micro_batch_size": form.batch_size,
            "lr": form.lr,
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "scheduler": "linear",
            "precision": "no",
            "seed": 0,
        },
        "preference": {"loss": "dpo", "beta": form.beta, "precompute_reference": way.precompute},
        "log": {"every_steps": 1, "trackers": []},
    }
    if way.method == "lora":
        settings["peft"] = {
            "method": "lora",
            "r": form.lora_r,
            "alpha": form.lora_alpha,
            "dropout": 0.0,
            "target_modules": "all-linear",
        }
    return settings


def ours_run(model: Path, train: Path, form: Form, way: Way, work_dir: Path) -> dict:
    """Our engine's run of one way, its steps as logged."""
    run = engine.train(work_dir / way.folder, ours_settings(model, train, form, way, work_dir))
    windows = run.windows
    for window in windows:  # padding positions from the logged share
        window["positions"] = window["tokens"] / (1 - window["pad_fraction"])
    return measures(windows, [w["loss"] for w in windows], run.measured)


# --- TRL's side ----------------------------------------------------------------------------


def trl_run(model: Path, train: Path, form: Form, way: Way, work_dir: Path) -> dict:
    """TRL's DPOTrainer in a fresh process (the worker `trl_dpo`, `trl_job` below)."""
    name = way.folder
    spec = {
        "model": str(model),
        "train": str(train),
        "form": asdict(form),
        "method": way.method,
        "precompute": way.precompute,
        "out_dir": str(work_dir / name),
    }
    measured, found = run_worker("trl_dpo", spec, work_dir / f"{name}.log")
    return measures(found["windows"], found["losses"], measured)


def mixed_rows_trainer() -> type:
    """DPOTrainer whose dataset is the pairs as JSON strings (column `row`): TRL's own
    preparation runs on the text rows and on the chat rows apart, since one Arrow column
    cannot hold strings and message lists, and the rows come back in file order."""
    import datasets
    from trl import DPOTrainer

    class MixedRowsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            rows = [json.loads(row) for row in dataset["row"]]
            parts, order = [], []
            for chat in (False, True):
                picked = [i for i, r in enumerate(rows) if isinstance(r["prompt"], list) == chat]
                if not picked:
                    continue
                part = datasets.Dataset.from_list([rows[i] for i in picked])
                part = super()._prepare_dataset(part, processing_class, args, dataset_name)
                if len(part) != len(picked):  # TRL drops prompts that fill max_length
                    raise RuntimeError(f"TRL dropped {len(picked) - len(part)} pairs")
                parts.append(part.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]))
                order += picked
            merged = datasets.concatenate_datasets(parts)
            return merged.select(sorted(range(len(order)), key=order.__getitem__))

    return MixedRowsDPOTrainer


def trl_config(form: Form, spec: dict):
    """DPOConfig: TRL's defaults but for the settings the comparison pins (see the module
    docstring)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=form.batch_size,
        max_steps=form.steps,
        learning_rate=form.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=form.max_length,
        beta=form.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=spec["precompute"],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )


def trl_job(spec: dict) -> dict[str, Any]:
    """The worker: TRL's DPOTrainer on the pairs; per step the time, and the real tokens
    and positions of the batch its collator made."""
    import datasets
    import transformers

    from benchmarks.hf_reference import counted_training

    form = Form(**spec["form"])
    transformers.logging.set_verbosity_error()
    transformers.set_seed(0)
    peft_config = None
    if spec["method"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=form.lora_r,
            lora_alpha=form.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    rows = [{"row": json.dumps(row)} for row in read_jsonl(Path(spec["train"]))]
    trainer = mixed_rows_trainer()(
        model=transformers.AutoModelForCausalLM.from_pretrained(spec["model"]),
        args=trl_config(form, spec),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(spec["model"]),
        peft_config=peft_config,
    )

    def count(batch) -> dict[str, int]:
        return {
            "tokens": int(batch["attention_mask"].sum()),
            "positions": batch["input_ids"].numel(),
        }

    return counted_training(trainer, count)


# --- both ----------------------------------------------------------------------------------


def measures(windows: list[dict], losses: list[float], measured: Measured) -> dict[str, Any]:
    """Tokens/s, step time and the padding share over every step but the first; the tokens
    and the time since the start of training at each step; the first and last losses (both
    sides start at log 2: the policy is its reference) and the run's wall time and peak
    RSS."""
    timed = steady_throughput(windows)
    positions = sum(w["positions"] for w in windows[1:])
    return {
        "tokens_per_s": timed["tokens_per_s"],
        "step_s": timed["step_s"],
        "timed_steps": timed["timed_steps"],
        "tokens_per_step": timed["timed_tokens"] / timed["timed_steps"],
        "pad_share": 1 - timed["timed_tokens"] / positions if positions else 0.0,
        "tokens": [w["tokens"] for w in windows],
        "elapsed_s": [w["elapsed_s"] for w in windows],  # per step: bursts of other load show
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "wall_s": measured.wall_s,
        "peak_rss_mb": measured.peak_rss_mb,
    }


def run(quick: bool, work_dir: Path, form: Form | None = None) -> dict[str, Any]:
    """The model, then every way's runs, interleaved round by round."""
    form = form or FORMS[quick]
    train = train_file(form, work_dir)
    model = build_llama_chat(work_dir / "model", pair_texts(), form.layers, form.hidden)
    data = pair_lengths(model, train)
    if data["max_tokens"] > form.max_length:
        raise RuntimeError(f"max_length {form.max_length} < a pair's {data['max_tokens']} tokens")
    runs: dict[str, dict] = {}
    loads = []
    for round_ in range(form.rounds):
        for way in WAYS:
            print(f"[dpo] round {round_ + 1}: {way.name} ...", flush=True)
            loads.append(os.getloadavg()[0])
            side = ours_run if way.side == "ours" else trl_run
            found = side(model, train, form, way, work_dir)
            rounds = [*runs.get(way.name, {}).get("rounds_tokens_per_s", []), found["tokens_per_s"]]
            if way.name not in runs or found["tokens_per_s"] > runs[way.name]["tokens_per_s"]:
                runs[way.name] = found
            runs[way.name]["rounds_tokens_per_s"] = rounds
    loads.append(os.getloadavg()[0])
    return {"form": asdict(form), "data": data, "runs": runs, "loads": loads}


# --- the results ---------------------------------------------------------------------------


def ratios(runs: dict[str, dict]) -> list[tuple[str, float | None]]:
    """Each comparison's name and its ratio of tokens/s."""
    speed = {name: r["tokens_per_s"] for name, r in runs.items()}
    return [(name, ratio(speed[a], speed[b])) for name, a, b in RATIOS]


def markdown(result: dict[str, Any]) -> str:
    """Settings, every run, then the ratios."""
    form, data, runs = Form(**result["form"]), result["data"], result["runs"]
    head = ["run", "tokens/s", "step (s)", "tokens per step", "padding share"]
    head += ["loss: first → last", "peak RSS (MB)", "run wall (s)"]
    rows = [
        [
            name,
            fmt(r["tokens_per_s"], 0),
            fmt(r["step_s"], 3),
            fmt(r["tokens_per_step"], 0),
            fmt(r["pad_share"], 3),
            f"{r['first_loss']:.4f} → {r['last_loss']:.4f}",
            fmt(r["peak_rss_mb"], 0),
            fmt(r["wall_s"], 0),
        ]
        for name, r in runs.items()
    ]
    lines = [
        "## Preference tuning: DPO throughput, ours vs TRL's DPOTrainer, LoRA and full",
        "",
        f"A random Llama built from config ({form.layers} layers, hidden {form.hidden}), "
        f"data/preference/train.jsonl ({data['pairs']} pairs, {data['chat_pairs']} of them "
        f"chat messages; {data['tokens_per_sequence']:.1f} tokens per sequence, at most "
        f"{data['max_tokens']}); beta {form.beta:g}, global batch {form.batch_size} pairs, "
        f"max_length {form.max_length} (nothing truncated), lr {form.lr:g}, {form.steps} "
        f"steps (the first is warm-up, not timed), fp32, one process; the fastest of "
        f"{form.rounds} round(s) per run, the runs interleaved. LoRA r {form.lora_r}, alpha "
        f"{form.lora_alpha:g}, every linear layer: the reference is the adapter off. Full: "
        "a frozen copy of the initial model (TRL's default), or its scores precomputed. TRL: "
        "its defaults but for bf16 and gradient checkpointing (both off, as ours). Tokens: "
        "the real tokens of chosen and rejected sequences, prompts included, counted the "
        f"same way on both sides. First loss log 2 = {math.log(2):.4f} (policy = reference); "
        "later losses differ a little as TRL also scores the chat template's newline after "
        "`<|im_end|>` on chat rows.",
        *load_warning(result["loads"]),
        "",
        *table(head, rows),
        "",
        *table(["ratio", "tokens/s"], [[n, fmt(v, 2)] for n, v in ratios(runs)]),
    ]
    return "\n".join(lines)
