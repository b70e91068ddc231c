"""Inference: `trainer predict` vs the naive way (one text at a time, padded to 128), same
model, same texts, in one process and as whole jobs in fresh processes. In process, also
what each part brings: batches in input order (no sorting), `trainer predict`'s default
(sorted by length, padded per batch), and its options `--pad-to-multiple-of 8`,
`--precision bf16` and `--quantize int8`, whose labels are compared with float32's.

Timings follow torch's thread count (one per core, or OMP_NUM_THREADS). With a thread per
core and another process busy, each operation waits for its slowest thread, which costs the
naive loop's many small operations far more than a few large batched ones: on a shared CPU,
OMP_NUM_THREADS=1 gives the fairer ratio.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import engine
from benchmarks.common import (
    ROOT,
    column_table,
    fmt,
    load_warning,
    ratio,
    read_jsonl,
    run_measured,
    run_worker,
)
from benchmarks.models import model_path

SOURCES = ("data/sentiment/train.csv", "data/sentiment/validation.csv")
MAX_LENGTH = 128  # the naive side pads to it; the model is trained with it (truncation)
WARMUP_TEXTS = 8
REPEATS = 2  # timed passes per way (1 in quick mode); the fastest counts, as in timeit
BATCH_SIZES = (32, 64)
OPTION_BATCH = 32  # the batch of the rows that turn on one option each
# (way, PredictOptions keywords): what each of trainer predict's speed options gives alone
OPTIONS = (
    ("ours + `--pad-to-multiple-of 8`", {"pad_to_multiple_of": 8}),
    ("ours + `--precision bf16` (autocast)", {"precision": "bf16"}),
)
FP32, INT8 = "ours (`Predictor.predict`)", "ours + `--quantize int8`"
EXACT = ("naive", "input order", "ours (", "ours + `--pad")  # ways that must equal naive
GOAL = 20  # the target speed-up over the naive way


def run(quick: bool, work_dir: Path, model: Path | None = None) -> dict[str, Any]:
    """Fine-tune the quickstart classifier for a few steps (speed does not depend on how
    well it is trained; or reuse `model`, a classifier's folder), then time every way in
    process and as whole jobs. `quick`: 20 training steps, every fourth review (115)."""
    folder = model or train_classifier(work_dir, steps=20 if quick else 40)
    texts = read_reviews()[:: 4 if quick else 1]
    repeats = 1 if quick else REPEATS
    return {
        "settings": {
            "model_dir": str(folder),
            "train_steps": trained_steps(folder),
            "texts": len(texts),
            "max_length": MAX_LENGTH,
            "warmup_texts": WARMUP_TEXTS,
            "repeats": repeats,
            "cpu_cores": os.cpu_count(),
        },
        **measure_in_process(folder, texts, repeats),
        "processes": measure_processes(folder, texts, work_dir),
    }


def train_classifier(work_dir: Path, steps: int) -> Path:
    """The quickstart classifier after `steps` steps, no validation; its final/ folder."""
    print(f"[inference] training the classifier ({steps} steps) ...", flush=True)
    data = {"max_length": MAX_LENGTH, "validation": None, "cache_dir": str(work_dir / "cache")}
    settings = {"model": {"name_or_path": model_path()}, "data": data, "log": {"trackers": []}}
    run = engine.train(
        work_dir / "sentiment", {**settings, "train": {"max_steps": steps}}, engine.QUICKSTART
    )
    return run.run_dir / "final"


def trained_steps(folder: Path) -> int | None:
    """Optimizer steps of the run that saved `folder` (None for a folder from elsewhere)."""
    summary = folder.parent / "run_summary.json"
    return json.loads(summary.read_text()).get("total_steps") if summary.is_file() else None


def read_reviews() -> list[str]:
    """The review texts of the shipped sentiment data (460, 7 to 47 tokens)."""
    texts = []
    for source in SOURCES:
        with (ROOT / source).open(newline="") as handle:
            texts += [row["text"] for row in csv.DictReader(handle)]
    return texts


class Naive:
    """What a first script does: one text at a time, padded to a fixed length."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.names = [self.model.config.id2label[i] for i in sorted(self.model.config.id2label)]

    def predict(self, texts: Sequence[str], pad: bool = True) -> list[dict]:
        """A label and class probabilities per text, each text in its own forward pass."""
        import torch

        padding = {"padding": "max_length"} if pad else {}
        rows = []
        with torch.no_grad():
            for text in texts:
                encoded = self.tokenizer(
                    text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt", **padding
                )
                rows.append(self.row(self.model(**encoded).logits.softmax(-1)[0].tolist()))
        return rows

    def row(self, probs: list[float]) -> dict:
        """The label and the class probabilities of one text."""
        label = self.names[max(range(len(probs)), key=probs.__getitem__)]
        return {"label": label, "probabilities": dict(zip(self.names, probs, strict=True))}

    def in_order(self, batch: int) -> Callable[[Sequence[str]], list[dict]]:
        """`predict_in_order` with this batch size."""
        return lambda texts: self.predict_in_order(texts, batch)

    def predict_in_order(self, texts: Sequence[str], batch: int) -> list[dict]:
        """The next step a script takes: batches of `batch` texts in input order, each
        padded to its longest (`padding=True`), not sorted by length."""
        import torch

        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch):
                encoded = self.tokenizer(
                    list(texts[start : start + batch]),
                    truncation=True,
                    max_length=MAX_LENGTH,
                    padding=True,
                    return_tensors="pt",
                )
                rows += map(self.row, self.model(**encoded).logits.softmax(-1).tolist())
        return rows


# --- in one process ----------------------------------------------------------------------------


Predict = Callable[[Sequence[str]], list[dict]]


def timed(predict: Predict, texts: Sequence[str], repeats: int = 1) -> dict:
    """One way alone: warmed up, then its fastest of `repeats` passes."""
    return timed_alternately([predict], texts, repeats)[0]


def timed_alternately(predicts: Sequence[Predict], texts: Sequence[str], repeats: int) -> list:
    """Warm every way up on the first texts (untimed), then `repeats` rounds of one timed
    pass over all texts per way, the ways in turn, so that a burst of other load on the CPU
    falls on all of them; each way's fastest pass counts (other load only slows a pass)."""
    for predict in predicts:
        predict(texts[:WARMUP_TEXTS])
    passes: list[list[float]] = [[] for _ in predicts]
    rows: list[list[dict]] = [[] for _ in predicts]
    loads: list[list[float]] = [[] for _ in predicts]
    for _ in range(repeats):
        for i, predict in enumerate(predicts):
            loads[i].append(os.getloadavg()[0])
            start = time.perf_counter()
            rows[i] = predict(texts)
            passes[i].append(time.perf_counter() - start)
            loads[i].append(os.getloadavg()[0])
    return [
        {"seconds": min(times), "passes_s": times, "rows": got, "loads": [min(at), max(at)]}
        for times, got, at in zip(passes, rows, loads, strict=True)
    ]


def agreement(rows: Sequence[dict], reference: Sequence[dict]) -> dict[str, Any]:
    """Share of equal labels and the largest gap in any class probability."""
    pairs = list(zip(rows, reference, strict=True))
    gap = max(
        abs(a["probabilities"][k] - v) for a, b in pairs for k, v in b["probabilities"].items()
    )
    differ = sum(a["label"] != b["label"] for a, b in pairs)
    return {"label_agreement": 1 - differ / len(pairs), "max_probability_gap": gap}


def way(name: str, batch: int, measured: dict, naive: dict, tokens: int) -> dict[str, Any]:
    """One row of the in-process table (without the predictions themselves)."""
    seconds = measured["seconds"]
    return {
        "way": name,
        "batch_size": batch,
        "seconds": seconds,
        "texts_per_s": len(measured["rows"]) / seconds,
        "real_tokens_per_s": tokens / seconds,
        "speedup_vs_naive": ratio(naive["seconds"], seconds),
        "passes_s": measured["passes_s"],
        **{f"{k}_vs_naive": v for k, v in agreement(measured["rows"], naive["rows"]).items()},
        "loads": measured["loads"],
    }


def ours(predictor, batch: int, **settings: Any) -> Predict:
    """`predictor.predict` with these options."""
    from trainer.inference import PredictOptions

    options = PredictOptions(batch_size=batch, **settings)
    return lambda texts: predictor.predict(texts, options)


def measure_in_process(folder: Path, texts: Sequence[str], repeats: int = 1) -> dict[str, Any]:
    """Naive (padded, then unpadded: splits the speed-up into padding and batching), then
    batched in input order (what sorting adds), ours at each batch size, ours with one
    speed option each, ours with int8 Linear layers; every way warmed up and timed alike,
    in turn (`timed_alternately`)."""
    import torch

    from trainer.commands.predict import load_predictor

    naive_model = Naive(folder)
    encoded = naive_model.tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    print(f"[inference] {len(texts)} texts: naive, ours, ours + options ...", flush=True)
    predictor = load_predictor(str(folder), [], "no")
    quantized = load_predictor(str(folder), [], "no")  # int8 has no way back: its own copy
    candidates: list[tuple[str, int, Predict]] = [
        ("naive (padded to 128)", 1, naive_model.predict),
        ("naive, unpadded", 1, lambda t: naive_model.predict(t, pad=False)),
        ("input order, padded per batch", OPTION_BATCH, naive_model.in_order(OPTION_BATCH)),
        *((FP32, batch, ours(predictor, batch)) for batch in BATCH_SIZES),
        *((name, OPTION_BATCH, ours(predictor, OPTION_BATCH, **kw)) for name, kw in OPTIONS),
        # the int8 predictor's warm-up quantizes it
        (INT8, OPTION_BATCH, ours(quantized, OPTION_BATCH, quantize="int8")),
    ]
    measured = timed_alternately([predict for *_, predict in candidates], texts, repeats)
    by_way = {(name, batch): m for (name, batch, _), m in zip(candidates, measured, strict=True)}
    naive = measured[0]
    return {
        "real_tokens": tokens,
        "ways": [way(name, batch, m, naive, tokens) for (name, batch), m in by_way.items()],
        "int8_vs_fp32": agreement(
            by_way[(INT8, OPTION_BATCH)]["rows"], by_way[(FP32, OPTION_BATCH)]["rows"]
        ),
        "torch_threads": torch.get_num_threads(),
    }


# --- whole jobs in fresh processes ---------------------------------------------------------------


def measure_processes(folder: Path, texts: Sequence[str], work_dir: Path) -> dict[str, Any]:
    """`trainer predict` vs the naive loop as a script, each a whole job in its own process
    (start-up, imports, loading the model, reading the csv, writing jsonl)."""
    inputs = work_dir / "inputs.csv"
    with inputs.open("w", newline="") as handle:
        csv.writer(handle).writerows([["text"], *([text] for text in texts)])
    spec = {"model": str(folder), "input": str(inputs), "output": str(work_dir / "naive.jsonl")}
    measured, inner = run_worker("naive", spec, work_dir / "naive-job.log")
    naive = {**job_cost(measured), "predict_s": inner["seconds"]}
    io = ["--input", str(inputs), "--output", str(work_dir / "ours.jsonl")]
    command = engine.trainer_command("predict", str(folder), *io, "--batch-size", "32")
    measured = run_measured(command, work_dir / "ours-job.log")
    printed = (work_dir / "ours-job.log").read_text().splitlines()
    stats = json.loads([line for line in printed if line.startswith("{")][-1])
    ours = {**job_cost(measured), "predict_s": stats["seconds"]}
    return {
        "texts": len(texts),
        "batch_size": 32,
        "naive": naive,
        "ours": ours,
        "speedup_wall": ratio(naive["wall_s"], ours["wall_s"]),
        "speedup_predict": ratio(naive["predict_s"], ours["predict_s"]),
        **agreement(read_jsonl(work_dir / "ours.jsonl"), read_jsonl(work_dir / "naive.jsonl")),
    }


def job_cost(measured) -> dict[str, Any]:
    """A whole job's wall time, peak RSS and the load around it."""
    loads = [measured.load_before, measured.load_after]
    return {"wall_s": measured.wall_s, "peak_rss_mb": measured.peak_rss_mb, "loads": loads}


def naive_job(spec: dict) -> dict[str, Any]:
    """The worker "naive": read the csv, predict one text at a time, write jsonl."""
    with Path(spec["input"]).open(newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    model = Naive(Path(spec["model"]))
    start = time.perf_counter()
    rows = model.predict(texts)
    seconds = time.perf_counter() - start
    Path(spec["output"]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"rows": len(rows), "seconds": seconds}


# --- the section's Markdown --------------------------------------------------------------------


def best_way(result: dict, prefix: str) -> dict:
    """The fastest way whose name starts with `prefix`."""
    ways = [w for w in result["ways"] if w["way"].startswith(prefix)]
    return max(ways, key=lambda w: w["speedup_vs_naive"])


def summary(result: dict) -> str:
    """The headline: the default's and the fastest option's speed-up against the goal, and
    where the default's comes from (padding, batching, sorting)."""
    ways = {w["way"]: w for w in result["ways"]}
    best, fastest = best_way(result, "ours ("), best_way(result, "ours")
    padding = ways["naive, unpadded"]["speedup_vs_naive"]
    in_order = ways["input order, padded per batch"]["speedup_vs_naive"]
    verdict = "meets" if best["speedup_vs_naive"] >= GOAL else "falls short of"
    return (
        f"**Speed-up of `trainer predict` over the naive way: {best['speedup_vs_naive']:.1f}×** "
        f"(default options, batch {best['batch_size']}, in process), which {verdict} the "
        f"issue's goal of {GOAL}×; the fastest option, {fastest['way'].removeprefix('ours + ')}"
        f", gives {fastest['speedup_vs_naive']:.1f}× (labels equal to naive: "
        f"{fmt(fastest['label_agreement_vs_naive'], 3)}). Of the default's, not padding to 128 "
        f"gives {padding:.1f}× (naive / naive unpadded: these reviews average "
        f"{result['real_tokens'] / result['settings']['texts']:.1f} tokens), batching in input "
        f"order {fmt(ratio(in_order, padding), 1)}× more, and sorting by length "
        f"{fmt(ratio(best['speedup_vs_naive'], in_order), 1)}× more. Labels equal to the naive "
        f"ones: {fmt(best['label_agreement_vs_naive'], 3)}. As whole jobs (start-up "
        f"included): {fmt(result['processes']['speedup_wall'], 1)}×."
    )  # fmt: skip


def int8_note(q: dict) -> str:
    """How far int8's labels are from fp32's."""
    return (
        "`--quantize int8` (never the default) is `torch.ao.quantization.quantize_dynamic` "
        "on every `torch.nn.Linear` (qint8; trainer/model/int8.py says why not torchao). "
        f"Its labels equal fp32 ours (batch {OPTION_BATCH}) on "
        f"{fmt(q['label_agreement'], 3)} of the texts (largest probability gap "
        f"{q['max_probability_gap']:.3f})."
    )


WAYS = [
    ("way", lambda w: w["way"]),
    ("batch", lambda w: w["batch_size"]),
    ("seconds", lambda w: fmt(w["seconds"], 2)),
    ("texts/s", lambda w: f"{w['texts_per_s']:,.1f}"),
    ("real tokens/s", lambda w: f"{w['real_tokens_per_s']:,.0f}"),
    ("× vs naive", lambda w: fmt(w["speedup_vs_naive"], 1)),
    ("labels = naive", lambda w: fmt(w["label_agreement_vs_naive"], 3)),
    ("max prob. gap", lambda w: f"{w['max_probability_gap_vs_naive']:.1e}"),
]
JOBS = [
    ("whole job", lambda j: j[0]),
    ("wall time (s)", lambda j: fmt(j[1]["wall_s"], 1)),
    ("of which predicting (s)", lambda j: fmt(j[1]["predict_s"], 2)),
    ("peak RSS (MB)", lambda j: f"{j[1]['peak_rss_mb']:,.0f}"),
    ("× vs naive (wall)", lambda j: j[2]),
]


def markdown(result: dict) -> str:
    """Settings, the headline, the in-process table, the int8 note, the whole jobs."""
    s, p = result["settings"], result["processes"]
    trained = f"fine-tuned for {s['train_steps']} steps" if s["train_steps"] else s["model_dir"]
    loads = [x for w in [*result["ways"], p["naive"], p["ours"]] for x in w["loads"]]
    jobs = [("naive script", p["naive"], "1.0")]
    jobs.append(("`trainer predict`", p["ours"], fmt(p["speedup_wall"], 1)))
    return "\n".join(
        [
            "## Inference: `trainer predict` vs one text at a time",
            "",
            f"all-MiniLM-L6-v2 sentiment classifier ({trained}, max_length {s['max_length']}), "
            f"{s['texts']} reviews of `data/sentiment/` ({result['real_tokens']:,} real "
            f"tokens), CPU, {result['torch_threads']} torch threads, fp32. In one process; "
            f"each way first runs the same {s['warmup_texts']} texts "
            f"untimed, then {s.get('repeats', 1)} round(s) of one timed pass over all texts "
            "per way, the ways in turn, tokenization included; a way's fastest pass counts. "
            "Naive: "
            "`AutoModelForSequenceClassification`, `model.eval()`, `torch.no_grad()`, one text "
            'per forward pass, `padding="max_length", truncation=True, max_length=128`. Ours: '
            '`load_predictor(folder, [], "no").predict(texts, PredictOptions(batch_size=B))`, '
            "the options rows with one option set each. Input order: the naive model on "
            "batches of the texts as they come, `padding=True`.",
            "",
            summary(result),
            "",
            f"1-minute load average around the timed passes and jobs: {min(loads):.1f} to "
            f"{max(loads):.1f} on {s['cpu_cores']} cores.",
            *load_warning(loads),
            "",
            *column_table(WAYS, result["ways"]),
            "",
            int8_note(result["int8_vs_fp32"]),
            "",
            f"Whole jobs, each a fresh process: the naive loop above as a script vs `python -m "
            f"trainer predict --batch-size {p['batch_size']}`. Labels equal: "
            f"{fmt(p['label_agreement'], 3)}.",
            "",
            *column_table(JOBS, jobs),
        ]
    )
