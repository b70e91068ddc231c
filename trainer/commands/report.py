"""`trainer report`: a run directory as PNG plots and one `report.md` that a person can read.

It reads only what a run leaves (metrics.jsonl, eval_results.json, run_summary.json,
config.yaml, samples.jsonl), never the model, so it is fast, works on a copy of the run
folder on a laptop, and works while the run is still training: whatever is not there yet
is left out and the report says so. matplotlib is imported here only, and drawn through the
Agg canvas with no pyplot state, so the command needs no display and `trainer --help` does
not pay for it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import UserError
from trainer.run.records import read_records
from trainer.tasks.registry import TASKS

# Settings shown in the report's config table; the whole config.yaml follows it.
KEY_SETTINGS = (
    "task",
    "model.name_or_path",
    "model.from_scratch",
    "peft.method",
    "peft.r",
    "peft.alpha",
    "peft.target_modules",
    "data.train",
    "data.validation",
    "data.max_length",
    "train.epochs",
    "train.max_steps",
    "train.global_batch_size",
    "train.micro_batch_size",
    "train.lr",
    "train.scheduler",
    "train.warmup_ratio",
    "train.weight_decay",
    "train.layerwise_lr_decay",
    "train.precision",
    "train.seed",
    "eval.metric",
    "eval.every_steps",
)
PEFT_ONLY = ("peft.r", "peft.alpha", "peft.target_modules")
# Every image this module may write: a stale one from an earlier report is removed.
IMAGES = (
    "loss.png",
    "lr.png",
    "throughput.png",
    "confusion_matrix.png",
    "f1_per_class.png",
    "f1_per_type.png",
)


@dataclass
class RunRecords:
    """What a run directory holds so far; the optional parts are None while missing."""

    run_dir: Path
    steps: list[dict]  # metrics.jsonl records of training steps
    evaluations: list[dict]  # metrics.jsonl records of evaluations (eval_* keys)
    config_text: str | None = None
    config: dict = field(default_factory=dict)
    summary: dict | None = None
    results: dict | None = None  # eval_results.json: present once the run finished
    wall_s: float | None = None
    samples: list[dict] = field(default_factory=list)  # samples.jsonl: the latest step's


# --- reading the run -------------------------------------------------------------------


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Split metrics.jsonl into step and evaluation records (see run/records.py)."""
    steps, evaluations = [], []
    for record in read_records(path):
        if any(key.startswith("eval_") for key in record):
            evaluations.append(record)
        elif "loss" in record:
            steps.append(record)
    return steps, evaluations


def _read_json(path: Path) -> dict | None:
    """A JSON file of the run, or None when it is not written yet."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def _wall_seconds(run_dir: Path) -> float | None:
    """Seconds from run_summary.json (written once the model and data are ready) to the
    last file the run wrote: the wall time of the latest start, evaluation included."""
    start = run_dir / "run_summary.json"
    ends = [run_dir / name for name in ("eval_results.json", "metrics.jsonl")]
    ends = [path for path in ends if path.is_file()]
    if not start.is_file() or not ends:
        return None
    seconds = max(path.stat().st_mtime for path in ends) - start.stat().st_mtime
    return seconds if seconds >= 0 else None


def read_run(run_dir: str | Path) -> RunRecords:
    """Everything the report needs from RUN_DIR; metrics.jsonl is the one required file."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UserError(f"RUN_DIR: {folder} is not a directory")
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"RUN_DIR: {folder} has no metrics.jsonl (is it a run directory?)")
    steps, evaluations = _read_metrics(metrics)
    if not steps and not evaluations:
        raise UserError(f"{metrics}: no step logged yet")
    records = RunRecords(folder, steps, evaluations)
    config_path = folder / "config.yaml"
    if config_path.is_file():
        records.config_text = config_path.read_text(encoding="utf-8")
        records.config = yaml.safe_load(records.config_text) or {}
    records.summary = _read_json(folder / "run_summary.json")
    records.results = _read_json(folder / "eval_results.json")
    records.wall_s = _wall_seconds(folder)
    records.samples = latest_samples(folder / "samples.jsonl")
    return records


def latest_samples(path: Path) -> list[dict]:
    """The records of the latest evaluation in samples.jsonl (eval.generate); none without."""
    if not path.is_file():
        return []
    records = read_records(path)
    latest = max((record["step"] for record in records), default=None)
    return [record for record in records if record["step"] == latest]


def training_seconds(steps: list[dict]) -> float | None:
    """The training clock (evaluation and saving left out). It continues across resumes, so
    its last value is the total; in runs from before it did, it restarted at 0 at each
    resume, and each segment's last value is added up."""
    total, previous = 0.0, 0.0
    for record in steps:
        now = record.get("elapsed_s")
        if now is None:
            continue
        if now < previous:
            total += previous
        previous = now
    total += previous
    return total or None


# --- plots -------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.0):
    """A figure on the Agg canvas, outside pyplot: no display, no global figure list."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) where `key` is a finite number; non-finite values are logged as null."""
    pairs = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _line_plot(path: Path, records: list[dict], key: str, title: str, ylabel: str) -> bool:
    """One metric over steps; False (nothing written) when the run never logged it."""
    steps, values = _series(records, key)
    if not steps:
        return False
    figure, axes = _figure()
    axes.plot(steps, values, marker="." if len(steps) < 50 else None)
    axes.set(title=title, xlabel="step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    figure.savefig(path)
    return True


def plot_loss(
    path: Path, steps: list[dict], evaluations: list[dict], best_step: int | None = None
) -> bool:
    """Training and validation loss on one set of axes, so over-fitting shows as the two
    curves parting; a dotted line marks the step whose model became final/."""
    train_steps, train_loss = _series(steps, "loss")
    eval_steps, eval_loss = _series(evaluations, "eval_loss")
    if not train_steps and not eval_steps:
        return False
    figure, axes = _figure()
    if train_steps:
        axes.plot(train_steps, train_loss, label="training", linewidth=1)
    if eval_steps:
        axes.plot(eval_steps, eval_loss, label="validation", marker="o")
    if best_step is not None:
        axes.axvline(best_step, color="gray", linestyle=":", label=f"best (step {best_step})")
    axes.set(title="Loss", xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path)
    return True


def _label_x_axis(axes, names: list[str], rotate: bool) -> None:
    """Names under each column, slanted when many would overlap."""
    axes.set_xticks(range(len(names)), names, rotation=45 if rotate else 0)
    if rotate:
        for label in axes.get_xticklabels():
            label.set_horizontalalignment("right")


def plot_confusion_matrix(path: Path, matrix: list[list[int]], labels: list[str]) -> None:
    """Counts as a heatmap (rows: true, columns: predicted) with each cell written in, so
    which classes get confused reads at a glance."""
    size = len(labels)
    figure, axes = _figure(max(4.0, 0.6 * size + 2.5), max(3.5, 0.6 * size + 2.0))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set(title="Confusion matrix", xlabel="predicted", ylabel="true")
    _label_x_axis(axes, labels, rotate=size > 4)
    axes.set_yticks(range(size), labels)
    if size <= 30:
        darkest = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                color = "white" if count > darkest / 2 else "black"
                axes.text(j, i, str(count), ha="center", va="center", color=color)
    figure.savefig(path)


def plot_f1_bars(path: Path, f1_by_name: dict[str, float], title: str) -> None:
    """F1 of each class (or entity type) as bars on a 0-1 scale: a weak class hides
    behind a good average."""
    names, values = list(f1_by_name), list(f1_by_name.values())
    figure, axes = _figure(max(4.0, 0.5 * len(names) + 2.0), 4.0)
    bars = axes.bar(range(len(names)), values, color="tab:blue")
    axes.bar_label(bars, fmt="%.3f")
    _label_x_axis(axes, names, rotate=len(names) > 6)
    axes.set(title=title, ylabel="F1", ylim=(0, 1.1))
    figure.savefig(path)


def draw_plots(run: RunRecords, out: Path) -> dict[str, str]:
    """Every plot the run has data for, written into `out`: {image name: caption}."""
    made: dict[str, str] = {}
    results = run.results or {}
    if plot_loss(out / "loss.png", run.steps, run.evaluations, results.get("best_step")):
        made["loss.png"] = "Training and validation loss"
    if _line_plot(out / "lr.png", run.steps, "lr", "Learning rate", "learning rate"):
        made["lr.png"] = "Learning rate"
    if _line_plot(out / "throughput.png", run.steps, "tokens_per_s", "Throughput", "tokens/s"):
        made["throughput.png"] = "Throughput (non-padding tokens/s, all processes)"
    if "confusion_matrix" in results and "labels" in results:
        plot_confusion_matrix(
            out / "confusion_matrix.png", results["confusion_matrix"], results["labels"]
        )
        made["confusion_matrix.png"] = "Confusion matrix (rows: true, columns: predicted)"
    if results.get("f1_per_class"):
        plot_f1_bars(out / "f1_per_class.png", results["f1_per_class"], "F1 per class")
        made["f1_per_class.png"] = "F1 per class"
    if results.get("f1_per_type"):
        plot_f1_bars(out / "f1_per_type.png", results["f1_per_type"], "F1 per entity type")
        made["f1_per_type.png"] = "F1 per entity type"
    return made


# --- report.md ---------------------------------------------------------------------------


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return lines + [f"| {name} | {value} |" for name, value in rows]


def _setting(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _duration(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02.0f} s"
    return f"{minutes} min {secs:04.1f} s" if minutes else f"{secs:.1f} s"


def _status_lines(run: RunRecords) -> list[str]:
    """Whether the run finished, and which parts of the report are missing because not."""
    last = run.steps[-1]["step"] if run.steps else run.evaluations[-1]["step"]
    total = (run.summary or {}).get("total_steps")
    of_total = f" of {total}" if total else ""
    if run.results is not None:
        return [f"Finished: {run.results.get('steps', last)}{of_total} steps."]
    return [
        f"**Not finished** (or stopped before the end): last logged step {last}{of_total}. "
        "There is no eval_results.json yet, so the final metrics, the confusion matrix and "
        "the per-class F1 are left out; run `trainer report` again when it is done."
    ]


def _overview_rows(run: RunRecords) -> list[tuple[str, str]]:
    """run_summary.json highlights and the clocks: what ran, how big, how long."""
    summary, rows = run.summary or {}, []
    model = _setting(run.config, "model.name_or_path")
    rows += [("task", f"`{summary.get('task') or _setting(run.config, 'task')}`")]
    if model:
        rows.append(("model", f"`{model}`"))
    for key, name in (
        ("train_examples", "training examples"),
        ("validation_examples", "validation examples"),
        ("total_steps", "optimizer steps (planned)"),
        ("steps_per_epoch", "steps per epoch"),
        ("global_batch_size", "global batch"),
        ("accumulation_steps", "gradient accumulation"),
        ("processes", "processes"),
    ):
        if summary.get(key) is not None:
            rows.append((name, f"{summary[key]:,}"))
    if summary.get("parameters"):
        share = summary.get("trainable_share", 1.0)
        rows.append(("parameters", f"{summary['parameters']:,}"))
        trainable = summary.get("trainable_parameters", 0)
        rows.append(("trainable", f"{trainable:,} ({100 * share:.2f}%)"))
    if summary.get("peft"):
        rows.append(("peft", f"`{summary['peft']}`"))
    train_s = training_seconds(run.steps)
    if train_s is not None:
        rows.append(("training time (evaluation and saving left out)", _duration(train_s)))
    if run.wall_s is not None:
        rows.append(("wall time (latest start, model loading left out)", _duration(run.wall_s)))
    return rows


def _metrics_section(run: RunRecords) -> list[str]:
    """The final metrics exactly as eval_results.json has them; for an unfinished run, the
    latest evaluation logged so far instead."""
    if run.results is not None:
        rows = [
            (key, f"`{value}`" if isinstance(value, str) else json.dumps(value))
            for key, value in run.results.items()
            if isinstance(value, (int, float, str)) and not isinstance(value, bool)
        ]
        source = "From `eval_results.json`"
        if "best_step" in run.results:
            source += f" (the best evaluation by `{run.results.get('metric')}`, at that step)"
        return ["## Final metrics", "", source + ":", "", *_table(("metric", "value"), rows)]
    if not run.evaluations:
        return ["## Final metrics", "", "None yet: the run has not finished or evaluated."]
    latest = run.evaluations[-1]
    rows = [(key, json.dumps(value)) for key, value in latest.items() if key != "step"]
    return [
        "## Latest evaluation",
        "",
        f"Not final: the evaluation at step {latest['step']} from `metrics.jsonl`.",
        "",
        *_table(("metric", "value"), rows),
    ]


def _cell(text: str | None, width: int, keep_end: bool = False) -> str:
    """One line of a table cell, at most `width` characters: newlines shown as ⏎, pipes
    escaped; a prompt keeps its end (the question), an answer its start."""
    if text is None:
        return ""
    flat = text.replace("\n", "⏎").replace("|", "\\|")
    if len(flat) <= width:
        return flat
    return "…" + flat[-(width - 1) :] if keep_end else flat[: width - 1] + "…"


def samples_section(samples: list[dict], width: int = 60) -> list[str]:
    """The latest evaluation's generated answers next to their prompts and references."""
    if not samples:
        return []
    lines = [f"## Samples (step {samples[0]['step']})", "", "| prompt | reference | generated |"]
    lines.append("|---|---|---|")
    for sample in samples:
        prompt = _cell(sample.get("prompt"), width, keep_end=True)
        reference = _cell(sample.get("reference"), width)
        lines.append(f"| {prompt} | {reference} | {_cell(sample.get('generated'), width)} |")
    return lines


def _config_section(run: RunRecords) -> list[str]:
    """The key settings as a table, then the whole config.yaml folded away."""
    if run.config_text is None:
        return ["## Config", "", "No config.yaml in the run directory."]
    peft_on = _setting(run.config, "peft.method") not in (None, "none")
    rows = []
    for key in KEY_SETTINGS:
        value = _setting(run.config, key)
        if value is None or (key in PEFT_ONLY and not peft_on):
            continue
        rows.append((f"`{key}`", f"`{json.dumps(value)}`"))
    return [
        "## Config",
        "",
        *_table(("key", "value"), rows),
        "",
        "<details><summary>config.yaml</summary>",
        "",
        "```yaml",
        run.config_text.rstrip("\n"),
        "```",
        "",
        "</details>",
    ]


def render_markdown(run: RunRecords, images: dict[str, str]) -> str:
    """report.md: status, overview, final metrics, the plots (relative links, so the folder
    can be moved or attached as it is), and the config."""
    lines = [f"# Run report: {run.run_dir.resolve().name}", "", f"Run directory: `{run.run_dir}`"]
    lines += ["", *_status_lines(run), "", "## Overview", ""]
    lines += _table(("", ""), _overview_rows(run))
    lines += ["", *_metrics_section(run), ""]
    if run.samples:
        lines += [*samples_section(run.samples), ""]
    lines += ["## Plots", ""]
    for name, caption in images.items():
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    task = TASKS.get((run.summary or {}).get("task") or _setting(run.config, "task"))
    if run.results is None and task is not None and task.has_labels:
        lines += ["Confusion matrix and per-class F1: not available until the run finishes.", ""]
    lines += _config_section(run)
    return "\n".join(lines) + "\n"


def make_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the plots and report.md for RUN_DIR into `out` (default RUN_DIR/report/);
    returns the path of report.md."""
    run = read_run(run_dir)
    folder = Path(out) if out is not None else run.run_dir / "report"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out: cannot create {folder} ({err.strerror})") from None
    images = draw_plots(run, folder)
    for name in IMAGES:
        if name not in images:
            (folder / name).unlink(missing_ok=True)
    report = folder / "report.md"
    report.write_text(render_markdown(run, images), encoding="utf-8")
    return report
