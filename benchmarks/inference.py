"""Inference speed: `trainer predict` vs the naive way (one text at a time, padded to 128),
same model, same texts, same machine.

What it measures
----------------
Model: a sentiment classifier fine-tuned from all-MiniLM-L6-v2 (the offline copy) with
``trainer train configs/quickstart-sentiment-minilm.yaml`` for a few steps (20 in quick
mode, 40 otherwise; speed does not depend on how well it is trained), with
``data.max_length=128`` so that both sides truncate at 128 tokens, no validation; or the
``final/`` folder of an earlier run (``--model-dir``, or ``<work-dir>/sentiment/final``
when it exists). Inputs: the reviews of data/sentiment/train.csv + validation.csv (460
texts, 7 to 47 tokens with [CLS]/[SEP], so nothing is truncated); quick mode: 115 of them
(every fourth, in file order).

In one process, one after the other, each side first runs the same first 8 texts untimed
(warm-up), then one timed pass over all texts (tokenization included on both sides):

- ``naive``: ``AutoModelForSequenceClassification`` + ``AutoTokenizer`` from the folder,
  ``model.eval()``, ``torch.no_grad()``, one text at a time, ``padding="max_length",
  truncation=True, max_length=128``; the label is the argmax of the logits.
- ``naive, unpadded``: the same loop without padding (each text its own length): not a
  way anyone is told to use, but it splits the speed-up into padding and batching.
- ``ours``: ``trainer.inference.load_predictor(folder, [], "no")`` then
  ``.predict(texts, PredictOptions(batch_size=B))`` for B in 32 and 64 (the engine sorts
  by length and pads each batch to its longest text, under ``torch.inference_mode()``).
- ``ours + int8 (experiment)``: the predictor's model through
  ``torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)``
  (weights int8, activations quantized on the fly), batch 32. Not the engine's default and
  not an engine option; its labels are compared with fp32 ours. torch marks
  ``torch.ao.quantization`` deprecated (to be replaced by torchao): the warning is silenced.

Reported per way: seconds, texts/s, real tokens/s (tokens of the texts without padding,
the same count for every way), the speed-up naive seconds / seconds, and the share of texts
whose predicted label equals the naive label (and the largest difference in a class
probability; for int8 vs fp32 also fp32's top probability where the labels differ). Then
the whole job as a fresh process each, wall time including Python start-up, imports,
loading the model, reading the input and writing the output, and its peak RSS:
``python -m trainer predict FOLDER --input inputs.csv --output ours.jsonl --batch-size 32``
vs this script as a naive worker (``--worker naive``: the naive loop
above over the same file, writing the same kind of jsonl); their labels are compared too.

torch uses its default thread count (one per core), or ``--threads N`` on both sides (in
process and in the jobs, through OMP_NUM_THREADS). The 1-minute load average before and
after is recorded: other processes on the CPU slow both sides, not alike. With a thread
per core and another process busy, each operation waits for its slowest thread, which
costs the naive loop's many small operations far more than a few large batched ones:
there ``--threads 1`` gives the fairer ratio.

How to run
----------
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py            # 460 texts
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py --quick    # 115 texts
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py --model-dir runs/x/final
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py --quick --threads 1

Results go to benchmarks/results/<YYYY-MM-DD>-inference.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py

from _common import (
    CONFIG,
    ROOT,
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

SOURCES = ("data/sentiment/train.csv", "data/sentiment/validation.csv")
MAX_LENGTH = 128  # the naive side pads to it; the model is trained with it (truncation)
WARMUP_TEXTS = 8
BATCH_SIZES = (32, 64)
QUANTIZED_BATCH = 32
TRAIN_STEPS = {True: 20, False: 40}  # quick, full
QUICK_STRIDE = 4  # quick mode: every fourth review (115 of 460)


# --- the model and the texts -------------------------------------------------------------------


def train_model(work_dir: Path, steps: int) -> Path:
    """Fine-tune the quickstart classifier for a few steps; returns its final/ folder."""
    run_dir = work_dir / "sentiment"
    if (run_dir / "final" / "config.json").is_file():
        return run_dir / "final"
    command = [sys.executable, "-m", "trainer", "train", str(CONFIG)]
    command += [
        f"model.name_or_path={model_path()}",
        f"output_dir={run_dir}",
        f"train.max_steps={steps}",
        f"data.max_length={MAX_LENGTH}",
        "data.validation=null",
        "eval.every_steps=0",
        "log.trackers=[]",
        f"data.cache_dir={work_dir / 'cache'}",
    ]
    print(f"[inference] training the classifier ({steps} steps) ...", flush=True)
    run_measured(command, work_dir / "train.log")
    return run_dir / "final"


def trained_steps(folder: Path) -> int | None:
    """Optimizer steps of the run that saved `folder` (None for a folder from elsewhere)."""
    summary = folder.parent / "run_summary.json"
    return json.loads(summary.read_text()).get("total_steps") if summary.is_file() else None


def read_reviews(quick: bool) -> list[str]:
    """The review texts of the shipped sentiment data (every fourth in quick mode)."""
    texts = []
    for source in SOURCES:
        with (ROOT / source).open(newline="") as handle:
            texts += [row["text"] for row in csv.DictReader(handle)]
    return texts[::QUICK_STRIDE] if quick else texts


def write_inputs(texts: Sequence[str], path: Path) -> Path:
    """The texts as a one-column csv, the input of both subprocess jobs."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([text] for text in texts)
    return path


# --- the naive way -----------------------------------------------------------------------------


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
                probs = self.model(**encoded).logits.softmax(-1)[0].tolist()
                best = max(range(len(probs)), key=probs.__getitem__)
                rows.append(
                    {
                        "label": self.names[best],
                        "probabilities": dict(zip(self.names, probs, strict=True)),
                    }
                )
        return rows


# --- timing ------------------------------------------------------------------------------------


def timed(predict: Callable[[Sequence[str]], list[dict]], texts: Sequence[str]) -> dict:
    """Warm up on the first texts (untimed), then time one pass over all of them."""
    predict(texts[:WARMUP_TEXTS])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rows = predict(texts)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "rows": rows,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def agreement(rows: Sequence[dict], reference: Sequence[dict]) -> dict[str, Any]:
    """Share of equal labels, the largest gap in any class probability, and how sure the
    reference was where the labels differ (its top probability: near 0.5 for a binary
    head means the text sat on the decision boundary)."""
    pairs = list(zip(rows, reference, strict=True))
    gap = max(
        abs(a["probabilities"][name] - b["probabilities"][name])
        for a, b in pairs
        for name in b["probabilities"]
    )
    differ = [max(b["probabilities"].values()) for a, b in pairs if a["label"] != b["label"]]
    return {
        "label_agreement": 1 - len(differ) / len(pairs),
        "max_probability_gap": gap,
        "labels_differ": len(differ),
        "max_reference_confidence_where_differ": max(differ, default=None),
    }


def way_result(way: str, batch: int, run_: dict, naive: dict, tokens: int) -> dict[str, Any]:
    """One row of the in-process table (without the predictions themselves)."""
    rows, seconds = run_["rows"], run_["seconds"]
    labels: dict[str, int] = {}
    for row in rows:
        labels[row["label"]] = labels.get(row["label"], 0) + 1
    return {
        "way": way,
        "batch_size": batch,
        "seconds": seconds,
        "texts_per_s": len(rows) / seconds,
        "real_tokens_per_s": tokens / seconds,
        "speedup_vs_naive": ratio(naive["seconds"], seconds),
        **{f"{k}_vs_naive": v for k, v in agreement(rows, naive["rows"]).items()},
        "predicted_labels": labels,
        "load_before": run_["load_before"],
        "load_after": run_["load_after"],
    }


@contextlib.contextmanager
def quiet_quantization() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation warnings (it still works in this torch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def measure_in_process(folder: Path, texts: Sequence[str]) -> dict[str, Any]:
    """Naive (padded, then unpadded), ours at each batch size, then ours with int8 Linear
    layers; every way warmed up and timed alike."""
    import torch

    from trainer.inference import PredictOptions, load_predictor

    naive_model = Naive(folder)
    encoded = naive_model.tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    print(f"[inference] naive: {len(texts)} texts one at a time ...", flush=True)
    naive = timed(naive_model.predict, texts)
    ways = [way_result("naive (padded to 128)", 1, naive, naive, tokens)]
    unpadded = timed(lambda t: naive_model.predict(t, pad=False), texts)
    ways.append(way_result("naive, unpadded", 1, unpadded, naive, tokens))

    predictor = load_predictor(str(folder), [], "no")
    fp32: dict[int, dict] = {}
    for batch in BATCH_SIZES:
        print(f"[inference] ours: batch {batch} ...", flush=True)
        options = PredictOptions(batch_size=batch)
        fp32[batch] = timed(lambda t, o=options: predictor.predict(t, o), texts)
        ways.append(way_result("ours (`Predictor.predict`)", batch, fp32[batch], naive, tokens))

    with quiet_quantization():
        predictor.model = torch.ao.quantization.quantize_dynamic(
            predictor.model, {torch.nn.Linear}, dtype=torch.qint8
        )
        options = PredictOptions(batch_size=QUANTIZED_BATCH)
        int8 = timed(lambda t: predictor.predict(t, options), texts)
    ways.append(
        way_result("ours + int8 dynamic (experiment)", QUANTIZED_BATCH, int8, naive, tokens)
    )
    return {
        "real_tokens": tokens,
        "ways": ways,
        "int8_vs_fp32": agreement(int8["rows"], fp32[QUANTIZED_BATCH]["rows"]),
        "torch_threads": torch.get_num_threads(),
    }


# --- whole jobs in fresh processes ---------------------------------------------------------------


def last_json(log: Path) -> dict:
    """The last JSON line a job printed (its own timing of the prediction)."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def run_job(name: str, command: list[str], output: Path, work_dir: Path) -> dict[str, Any]:
    """Run one whole job and read its predictions and its own timing."""
    print(f"[inference] {name}: whole job in a fresh process ...", flush=True)
    measured = run_measured(command, work_dir / f"{name}.log")
    inner = last_json(work_dir / f"{name}.log")
    return {
        "wall_s": measured.wall_s,
        "predict_s": inner["seconds"],
        "peak_rss_mb": measured.peak_rss_mb,
        "load_before": measured.load_before,
        "load_after": measured.load_after,
        "rows": read_jsonl(output),
    }


def measure_processes(
    folder: Path, texts: Sequence[str], work_dir: Path, threads: int | None
) -> dict[str, Any]:
    """`trainer predict` vs the naive loop, each a whole job in its own process."""
    inputs = write_inputs(texts, work_dir / "inputs.csv")
    ours_out, naive_out = work_dir / "ours.jsonl", work_dir / "naive.jsonl"
    io = ["--input", str(inputs), "--output"]
    start = ["env", f"OMP_NUM_THREADS={threads}", sys.executable] if threads else [sys.executable]
    naive_command = [*start, str(Path(__file__).resolve()), "--worker", "naive"]
    naive_command += ["--model-dir", str(folder), *io, str(naive_out)]
    naive = run_job("naive-job", naive_command, naive_out, work_dir)
    ours_command = [*start, "-m", "trainer", "predict", str(folder), *io, str(ours_out)]
    ours_command += ["--batch-size", str(BATCH_SIZES[0])]
    ours = run_job("ours-job", ours_command, ours_out, work_dir)
    same = agreement(ours.pop("rows"), naive.pop("rows"))
    return {
        "texts": len(texts),
        "batch_size": BATCH_SIZES[0],
        "naive": naive,
        "ours": ours,
        "speedup_wall": ratio(naive["wall_s"], ours["wall_s"]),
        "speedup_predict": ratio(naive["predict_s"], ours["predict_s"]),
        **same,
    }


def naive_worker(folder: Path, source: Path, target: Path) -> None:
    """The naive whole job: read the csv, predict one text at a time, write jsonl."""
    with source.open(newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    model = Naive(folder)
    start = time.perf_counter()
    rows = model.predict(texts)
    seconds = time.perf_counter() - start
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(json.dumps({"rows": len(rows), "seconds": seconds}))


# --- the section -------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with `threads` torch threads (None: torch's default), restored afterwards: the
    process may go on to run other sections."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def run(
    quick: bool, work_dir: Path, model_dir: Path | None = None, threads: int | None = None
) -> dict:
    """Train (or reuse) the classifier, then time every way in process and as whole jobs.
    `threads` pins torch's threads on both sides (e.g. 1 on a CPU shared with others)."""
    work_dir = work_dir.resolve()
    folder = model_dir.resolve() if model_dir else train_model(work_dir, TRAIN_STEPS[quick])
    texts = read_reviews(quick)
    with torch_threads(threads):
        in_process = measure_in_process(folder, texts)
    return {
        "settings": {
            "quick": quick,
            "model_dir": str(folder),
            "train_steps": trained_steps(folder),
            "texts": len(texts),
            "max_length": MAX_LENGTH,
            "warmup_texts": WARMUP_TEXTS,
            "batch_sizes": list(BATCH_SIZES),
            "cpu_cores": os.cpu_count(),
            "threads": threads,  # None: torch's default
        },
        **in_process,
        "processes": measure_processes(folder, texts, work_dir, threads),
    }


# --- report ----------------------------------------------------------------------------------

GOAL = 20  # the target speed-up over the naive way


def in_process_table(result: dict) -> list[str]:
    """One row per way, with the speed-up over naive and the label agreement."""
    lines = [
        "| way | batch | seconds | texts/s | real tokens/s | × vs naive | labels = naive "
        "| max prob. gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in result["ways"]:
        lines.append(
            f"| {w['way']} | {w['batch_size']} | {fmt(w['seconds'], 2)} | "
            f"{w['texts_per_s']:,.1f} | {w['real_tokens_per_s']:,.0f} | "
            f"{fmt(w['speedup_vs_naive'], 1)} | {fmt(w['label_agreement_vs_naive'], 3)} | "
            f"{w['max_probability_gap_vs_naive']:.1e} |"
        )
    return lines


def processes_table(result: dict) -> list[str]:
    """The two whole jobs, each in a fresh process."""
    p = result["processes"]
    lines = [
        "| whole job | wall time (s) | of which predicting (s) | peak RSS (MB) "
        "| × vs naive (wall) |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = (("naive script", p["naive"], 1.0), ("`trainer predict`", p["ours"], p["speedup_wall"]))
    for name, job, speedup in rows:
        lines.append(
            f"| {name} | {fmt(job['wall_s'], 1)} | {fmt(job['predict_s'], 2)} | "
            f"{job['peak_rss_mb']:,.0f} | {fmt(speedup, 1)} |"
        )
    return lines


def summary(result: dict) -> list[str]:
    """The headline: best speed-up vs the goal, and where it comes from."""
    ways = {(w["way"], w["batch_size"]): w for w in result["ways"]}
    ours = [w for w in result["ways"] if w["way"].startswith("ours (")]
    best = max(ours, key=lambda w: w["speedup_vs_naive"])
    padding = ways[("naive, unpadded", 1)]["speedup_vs_naive"]
    batching = ratio(best["speedup_vs_naive"], padding)
    verdict = "meets" if best["speedup_vs_naive"] >= GOAL else "falls short of"
    return [
        f"**Speed-up of `trainer predict` over the naive way: "
        f"{best['speedup_vs_naive']:.1f}×** (batch {best['batch_size']}, in process), which "
        f"{verdict} the issue's goal of {GOAL}×. Of it, not padding to 128 gives "
        f"{padding:.1f}× (naive / naive unpadded: these reviews average "
        f"{result['real_tokens'] / result['settings']['texts']:.1f} tokens) and batching "
        f"(sorted by length, padded per batch) the remaining {fmt(batching, 1)}×. Labels "
        f"equal to the naive ones: {fmt(best['label_agreement_vs_naive'], 3)}. As whole jobs "
        f"(start-up included): {fmt(result['processes']['speedup_wall'], 1)}×.",
    ]


def load_line(result: dict) -> list[str]:
    """The 1-minute load averages around the timed passes and jobs, and a warning when they
    show other processes on the CPU."""
    runs = [*result["ways"], result["processes"]["naive"], result["processes"]["ours"]]
    loads = [load for r in runs for load in (r["load_before"], r["load_after"])]
    return [
        f"1-minute load average around the timed passes and jobs: {min(loads):.1f} to "
        f"{max(loads):.1f} on {result['settings']['cpu_cores']} cores.",
        *load_warning(loads),
    ]


def markdown(result: dict) -> list[str]:
    """The section: settings, the in-process table, the whole-job table, the int8 note."""
    s, p, q = result["settings"], result["processes"], result["int8_vs_fp32"]
    trained = f"fine-tuned for {s['train_steps']} steps" if s["train_steps"] else s["model_dir"]
    return [
        "## Inference: `trainer predict` vs one text at a time",
        "",
        f"all-MiniLM-L6-v2 sentiment classifier ({trained}, max_length {s['max_length']}), "
        f"{s['texts']} reviews of `data/sentiment/` ({result['real_tokens']:,} real tokens), "
        f"CPU, {result['torch_threads']} torch threads, fp32. In one process, one way after "
        f"the other; each way first runs the same {s['warmup_texts']} texts untimed, then "
        "one timed pass over all texts, tokenization included. Naive: "
        "`AutoModelForSequenceClassification`, `model.eval()`, `torch.no_grad()`, one text "
        'per forward pass, `padding="max_length", truncation=True, max_length=128`. Ours: '
        '`load_predictor(folder, [], "no").predict(texts, PredictOptions(batch_size=B))`.',
        "",
        *summary(result),
        "",
        *load_line(result),
        "",
        *in_process_table(result),
        "",
        "The int8 row is an **experiment, not the engine's default** (nor one of its options): "
        "`torch.ao.quantization.quantize_dynamic(predictor.model, {torch.nn.Linear}, "
        "dtype=torch.qint8)`, whose deprecation warnings (torch.ao.quantization is to be "
        f"replaced by torchao) are silenced. Its labels equal fp32 ours on "
        f"{fmt(q['label_agreement'], 3)} of the texts ({q['labels_differ']} differ; largest "
        f"probability gap {q['max_probability_gap']:.3f}"
        + (
            f"; where they differ, fp32 gave its label at most "
            f"{q['max_reference_confidence_where_differ']:.3f}: texts on the decision "
            "boundary of a briefly trained model)."
            if q["labels_differ"]
            else ")."
        ),
        "",
        f"Whole jobs, each a fresh process (Python start-up, imports, model loading, reading "
        f"the {p['texts']} texts from csv, writing jsonl): the naive loop above as a script "
        f"vs `python -m trainer predict --batch-size {p['batch_size']}`. Labels equal: "
        f"{fmt(p['label_agreement'], 3)}.",
        "",
        *processes_table(result),
    ]


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (the --worker ones are internal: the naive whole job)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every fourth text, shorter training")
    parser.add_argument("--work-dir", type=Path, help="keep the model and logs here (default: tmp)")
    parser.add_argument("--model-dir", type=Path, help="a trained classifier's final/ to reuse")
    parser.add_argument(
        "--threads", type=int, help="torch threads on both sides (default: one per core)"
    )
    parser.add_argument("--worker", choices=["naive"], help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    """Run the section alone and write results/<date>-inference.{md,json}."""
    args = parse_args()
    if args.worker:
        naive_worker(args.model_dir, args.input, args.output)
        return
    result = in_work_dir(
        args.work_dir,
        "inference-",
        lambda folder: run(args.quick, folder, args.model_dir, args.threads),
    )
    machine = machine_info()
    header = [
        f"# Inference speed ({machine['date']})",
        "",
        f"Generated by `benchmarks/inference.py{' --quick' if args.quick else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}`. "
        f"{machine['cpu']}, {machine['cpu_cores']} cores, GPU: {machine['gpu'] or 'none'}; "
        f"torch {machine['torch']}, transformers {machine['transformers']}.",
        "",
    ]
    report = {"machine": machine, **result}
    path = write_results(report, "inference", "\n".join(header + markdown(result)) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
