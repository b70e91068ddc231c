"""What both sides of a comparison share: the job they run (one spec, which `engine` turns
into `trainer train` overrides and `hf_reference` into a `transformers.Trainer`), the
numbers each side reports, and the table that puts them side by side."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Measured, fmt, folder_size, ratio, table

LABELS = ["negative", "positive"]  # our engine's id order (alphabetical); 1 is positive
# LoRA/QLoRA's learning rate in every comparison: a low-rank update starting at zero needs a
# larger step than full fine-tuning (1e-4) to move as far in the same number of steps
LORA_LR = 1e-3


@dataclass(frozen=True)
class Lora:
    """LoRA settings both sides get (peft's default targets for BERT)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    modules_to_save: tuple[str, ...] = ("classifier",)


LORA = Lora()


@dataclass(frozen=True)
class Job:
    """One job, run alike by both sides: the quickstart config's settings unless set."""

    name: str
    task: str  # classification | mlm | clm
    train: str
    validation: str
    max_length: int
    metrics: Sequence[str]  # compared ours / other; the first is the engine's eval.metric
    epochs: int = 1
    max_steps: int = 0  # instead of epochs when above 0
    lr: float = 1e-4
    peft: str = "none"  # none | lora | qlora (the reference side: get_peft_model)
    log_every: int = 5
    batch_size: int = 16
    eval_batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    ours_grouped: bool = False  # ours with data.group_by_length (off by default, as Trainer's)
    keep_final: bool = False  # the reference side saves its model (to score it as ours is)


SENTIMENT = Job(
    "sentiment",
    "classification",
    "data/sentiment/train.csv",
    "data/sentiment/validation.csv",
    max_length=64,
    metrics=("accuracy", "f1", "loss"),
)
TEXT = {"train": "data/text/domain.txt", "validation": "data/text/domain_validation.txt"}


def side(
    measured: Measured,
    steps: int,
    samples: int,
    tokens: int,
    train_s: float,
    step_times: list[float],
    metrics: dict[str, float],
    final_dir: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One side's numbers: the whole job's cost, the training loop's throughput (useful,
    non-padding tokens), the step time (mean, and the median, less sensitive to bursts of
    other load), the saved folder's size and the final evaluation."""
    final = Path(final_dir) if final_dir else None
    return {
        "wall_s": measured.wall_s,
        "load_before": measured.load_before,
        "load_after": measured.load_after,
        "peak_rss_mb": measured.peak_rss_mb,
        "steps": steps,
        "train_samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / train_s,
        "train_tokens": tokens,
        "tokens_per_s": tokens / train_s,
        "step_s": train_s / steps,
        "step_s_median": statistics.median(step_times),
        "final_dir_bytes": folder_size(final) if final else None,
        "weights_bytes": sum(f.stat().st_size for f in final.glob("*.safetensors"))
        if final
        else None,
        "metrics": metrics,
        **extra,
    }


RATIO_KEYS = (
    "wall_s",
    "train_s",
    "step_s",
    "step_s_median",
    "samples_per_s",
    "tokens_per_s",
    "peak_rss_mb",
    "final_dir_bytes",
)


def ratios(job: Job, ours: dict, other: dict) -> dict[str, float | None]:
    """ours / other of time, throughput, memory, size and each compared metric."""
    found = {key: ratio(ours[key], other[key]) for key in RATIO_KEYS}
    return found | {m: ratio(ours["metrics"].get(m), other["metrics"].get(m)) for m in job.metrics}


def _mb(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 1e6


def loads(side: dict) -> str:
    """The 1-minute load average before and after one side's run."""
    return f"{side['load_before']:.2f} / {side['load_after']:.2f}"


# (label, ratio key, the cell of one side); a row whose cells are all n/a is left out
ROWS = [
    ("optimizer steps", None, lambda s: str(s["steps"])),
    ("samples trained", None, lambda s: str(s["train_samples"])),
    ("load average before / after", None, loads),
    ("wall time of the whole job (s)", "wall_s", lambda s: fmt(s["wall_s"], 1)),
    ("training loop time (s)", "train_s", lambda s: fmt(s["train_s"], 1)),
    ("step time, mean (s)", "step_s", lambda s: fmt(s["step_s"])),
    ("step time, median (s)", "step_s_median", lambda s: fmt(s["step_s_median"])),
    ("train samples/s", "samples_per_s", lambda s: fmt(s["samples_per_s"], 2)),
    ("useful tokens/s", "tokens_per_s", lambda s: fmt(s["tokens_per_s"], 1)),
    ("peak RSS (MB)", "peak_rss_mb", lambda s: fmt(s["peak_rss_mb"], 0)),
    ("peak GPU memory allocated (MB)", None, lambda s: fmt(s.get("gpu_peak_mb"), 0)),
    ("parameters (4-bit unpacked)", None, lambda s: f"{s['parameters']:,}"),
    ("trainable parameters", None, lambda s: f"{s['trainable_parameters']:,}"),
    ("trainable share", None, lambda s: fmt(s["trainable_parameters"] / s["parameters"], 6)),
    ("final/ on disk (MB)", "final_dir_bytes", lambda s: fmt(_mb(s["final_dir_bytes"]), 2)),
    ("weights file(s) (MB)", None, lambda s: fmt(_mb(s["weights_bytes"]))),
]


def sides_table(job: Job, columns: dict[str, dict], ratio_of: dict | None = None) -> list[str]:
    """A row per measure, a column per side (or per method), and with `ratio_of` (the
    `ratios` of two columns) a last column of ours / other."""
    rows = ROWS + [
        (f"eval {m}", m, lambda s, m=m: fmt(s["metrics"].get(m), 4)) for m in job.metrics
    ]
    lines = []
    for label, key, cell in rows:
        cells = [cell(s) for s in columns.values()]
        if all(c == "n/a" for c in cells):
            continue
        if ratio_of is not None:
            cells.append(fmt(ratio_of.get(key)) if key else "")
        lines.append([label, *cells])
    return table(["measure", *columns, *(["ours / other"] if ratio_of else [])], lines)
