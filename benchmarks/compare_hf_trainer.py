"""Training throughput: our engine vs plain `transformers.Trainer` (+ peft for LoRA) on the
same four jobs, each side in a fresh process, so that wall times include start-up, imports,
data preparation, model loading, training and the final evaluation.

Our engine runs with its optimisations as a user turns them on (`data.group_by_length` on
the classification jobs; Trainer's stays off, its default). It drops each epoch's partial
last batch, Trainer trains on it: samples/s and tokens/s count what each side trained on.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks import engine, hf_reference
from benchmarks.common import column_table, fmt, load_warning
from benchmarks.comparison import LORA_LR, SENTIMENT, TEXT, Job, ratios, sides_table
from benchmarks.models import build_gpt2, model_path

JOBS = (
    replace(SENTIMENT, epochs=4, ours_grouped=True),
    replace(SENTIMENT, name="sentiment-lora", epochs=4, lr=LORA_LR, peft="lora", ours_grouped=True),
    Job("mlm", "mlm", **TEXT, max_length=128, epochs=3, metrics=("perplexity", "loss")),
    Job("clm", "clm", **TEXT, max_length=128, epochs=3, metrics=("perplexity", "loss")),
)
SUMMARY = [
    ("job", lambda r: r["job"]["name"]),
    ("ours tokens/s", lambda r: fmt(r["ours"]["tokens_per_s"], 1)),
    ("Trainer tokens/s", lambda r: fmt(r["hf"]["tokens_per_s"], 1)),
    ("ratio", lambda r: fmt(r["ratio_ours_over_hf"]["tokens_per_s"], 2)),
    ("ours samples/s", lambda r: fmt(r["ours"]["samples_per_s"], 2)),
    ("Trainer samples/s", lambda r: fmt(r["hf"]["samples_per_s"], 2)),
    ("ratio", lambda r: fmt(r["ratio_ours_over_hf"]["samples_per_s"], 2)),
    ("wall time ratio (ours / Trainer)", lambda r: fmt(r["ratio_ours_over_hf"]["wall_s"], 2)),
]


def run(quick: bool, work_dir: Path) -> dict[str, Any]:
    """Every job on both sides, ours first; `quick`: one epoch each. CLM trains a GPT-2-style
    decoder of MiniLM's size built from config (random weights, MiniLM's tokenizer)."""
    results = []
    for job in JOBS:
        job = replace(job, epochs=1) if quick else job
        model = str(build_gpt2(work_dir / "gpt2")) if job.task == "clm" else model_path()
        print(f"[throughput] {job.name}: ours, then Trainer ({job.epochs} epochs) ...", flush=True)
        ours = engine.run_job(job, model, work_dir)
        hf = hf_reference.run_job(job, model, work_dir)
        results.append(
            {
                "job": asdict(job),
                "ours": ours,
                "hf": hf,
                "ratio_ours_over_hf": ratios(job, ours, hf),
            }
        )
    return {"quick": quick, "jobs": results}


def markdown(result: dict[str, Any]) -> str:
    """A summary row per job, then each job's measures side by side."""
    first = Job(**result["jobs"][0]["job"])
    lines = [
        "## Training throughput: our engine vs transformers.Trainer",
        "",
        "Each side runs in its own fresh process; wall time covers start-up, imports, data "
        "preparation, model loading, training and the final evaluation. Useful tokens are the "
        "non-padding ones.",
        "",
        f"- Shared settings: batch {first.batch_size}, warmup ratio {first.warmup_ratio}, "
        f"weight decay {first.weight_decay}, clipping {first.max_grad_norm}, seed {first.seed}"
        f", eval batch {first.eval_batch_size}, fp32, linear schedule, fused AdamW, eval once "
        "at the end; our engine drops each epoch's partial last batch, Trainer keeps it",
        "- Ours with `data.group_by_length=true` on the classification jobs (Trainer: its "
        "default, off); our MLM projects only masked positions onto the vocabulary",
        "",
        *column_table(SUMMARY, result["jobs"]),
        *load_warning([r[s]["load_before"] for r in result["jobs"] for s in ("ours", "hf")]),
    ]
    for r in result["jobs"]:
        job = Job(**r["job"])
        lines += [
            "",
            f"### {job.name} ({job.task}, {job.epochs} epochs, max_length {job.max_length}, "
            f"lr {job.lr}, peft {job.peft})",
            "",
            f"Train `{job.train}`, validation `{job.validation}`.",
            "",
            *sides_table(job, {"ours": r["ours"], "HF Trainer": r["hf"]}, r["ratio_ours_over_hf"]),
        ]
    return "\n".join(lines)
