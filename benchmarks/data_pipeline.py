"""The data pipeline, each pair measured in the same run: tokenization cold vs cached,
padding and step time with and without length grouping, streaming vs in-memory.

1. ``cache``: `prepare_data` (what `trainer prepare` and every run's set-up call) on an MLM
   corpus (data/text/domain.txt and the shipped reviews, shuffled and repeated), MiniLM's
   tokenizer, 128-token blocks: cold (the cache entry built), a cache hit, the cache off.
2. ``grouping``: sentiment fine-tuning of all-MiniLM-L6-v2 on reviews with IMDB's length
   distribution (log-normal word counts, median 174 words, sigma 0.75, built from sentences
   of data/sentiment/train.csv), max_length 256, batch 16, `data.group_by_length` off / on.
3. ``streaming``: MLM on the corpus of (1), batch 16, in memory (from the cache) vs
   `data.streaming`; and the pipeline alone, without a model: blocks/s out of the stream
   (read, tokenize, pack, shuffle, collate with masking) and out of the in-memory dataset.
"""

from __future__ import annotations

import csv
import random
import statistics
import time
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

from benchmarks import engine
from benchmarks.common import ROOT, column_table, fmt
from benchmarks.models import model_path

MAX_LENGTH_MLM = 128
MAX_LENGTH_REVIEWS = 256


def corpus(lines: int, folder: Path) -> Path:
    """An MLM corpus: the shipped domain text and reviews, shuffled, repeated to `lines`."""
    texts = (ROOT / "data/text/domain.txt").read_text().split("\n")
    with (ROOT / "data/sentiment/train.csv").open() as handle:
        texts += [row["text"] for row in csv.DictReader(handle)]
    texts = [text for text in texts if text.strip()]
    rng = random.Random(0)
    out = [rng.choice(texts) for _ in range(lines)]
    path = folder / "corpus.txt"
    path.write_text("\n".join(out) + "\n")
    return path


def imdb_like_reviews(count: int, folder: Path) -> Path:
    """Reviews with IMDB-like lengths, built from the shipped reviews' sentences."""
    with (ROOT / "data/sentiment/train.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["text"])
    rng = random.Random(1)
    path = folder / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        for _ in range(count):
            label = rng.choice(sorted(by_label))
            words = max(5, int(rng.lognormvariate(5.16, 0.75)))  # median e^5.16 = 174
            text: list[str] = []
            while len(text) < words:
                text += rng.choice(by_label[label]).split()
            writer.writerow({"text": " ".join(text[:words]), "label": label})
    return path


def base_config(task: str, train: Path, folder: Path, steps: int, max_length: int) -> dict:
    """A run config: all-MiniLM-L6-v2, batch 16, a metrics.jsonl record per step."""
    train_ = {"max_steps": steps, "global_batch_size": 16, "micro_batch_size": 16, "lr": 1e-4}
    return {
        "task": task,
        "output_dir": str(folder / task),  # for the in-process measures; runs set their own
        "model": {"name_or_path": model_path()},
        "data": {"train": str(train), "max_length": max_length, "cache_dir": str(folder / "cache")},
        "train": {**train_, "seed": 42},
        "log": {"every_steps": 1, "trackers": []},
    }


# --- 1. cache ------------------------------------------------------------------------------


def measure_cache(corpus_path: Path, folder: Path) -> dict:
    """`prepare_data` cold, from the cache, and with the cache off."""
    import datasets

    from trainer.config import build_config
    from trainer.data.prepare import prepare_data
    from trainer.model.load import load_tokenizer
    from trainer.tasks.registry import TASKS

    datasets.disable_progress_bars()
    raw = base_config("mlm", corpus_path, folder, 1, MAX_LENGTH_MLM)
    results = {}
    shared = str(folder / "cache-bench")
    for case, cache_dir in (("cold", shared), ("hit", shared), ("off", None)):
        raw["data"]["cache_dir"] = cache_dir
        cfg = build_config(raw, world_size=1)
        start = time.perf_counter()
        data, _ = prepare_data(cfg, lambda cfg=cfg: load_tokenizer(cfg.model, TASKS[cfg.task]))
        seconds = time.perf_counter() - start
        tokens = sum(len(split) for split in data.train) * MAX_LENGTH_MLM
        results[case] = {
            "status": data.cache["status"],
            "seconds": seconds,
            "blocks": tokens // MAX_LENGTH_MLM,
            "tokens_per_s": tokens / seconds,
        }
    results["cold_over_hit"] = results["cold"]["seconds"] / results["hit"]["seconds"]
    return results


# --- 2. and 3. runs in fresh processes ------------------------------------------------------


def run_training(raw: dict, folder: Path, name: str) -> dict:
    """`trainer train` in a fresh process: median step time (the first step left out),
    median tokens/s, mean padding share."""
    run = engine.train(folder / name, raw)
    records = run.windows
    step_s = [b - a for a, b in pairwise(r["elapsed_s"] for r in records)][1:]
    return {
        "wall_s": run.measured.wall_s,
        "load_before": run.measured.load_before,
        "median_step_s": statistics.median(step_s),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[2:]),
        "pad_fraction": statistics.mean(r["pad_fraction"] for r in records),
        "final_loss": records[-1]["loss"],
    }


def measure_grouping(folder: Path, steps: int) -> dict:
    """Sentiment with IMDB-like lengths, grouped by length or not."""
    reviews = imdb_like_reviews(steps * 16 + 64, folder)
    results = {}
    for grouped in (False, True):
        raw = base_config("classification", reviews, folder, steps, MAX_LENGTH_REVIEWS)
        raw["data"]["group_by_length"] = grouped
        results["on" if grouped else "off"] = run_training(raw, folder, f"grouping-{grouped}")
    off, on = results["off"], results["on"]
    results["step_time_on_over_off"] = on["median_step_s"] / off["median_step_s"]
    results["pad_fraction_on_over_off"] = on["pad_fraction"] / off["pad_fraction"]
    return results


def measure_streaming(corpus_path: Path, folder: Path, steps: int) -> dict:
    """MLM training in memory vs streamed, and the two pipelines alone."""
    results = {}
    for streaming in (False, True):
        raw = base_config("mlm", corpus_path, folder, steps, MAX_LENGTH_MLM)
        raw["data"]["streaming"] = streaming
        name = "streaming" if streaming else "in_memory"
        results[name] = run_training(raw, folder, name)
    results["pipeline_only"] = pipeline_only(corpus_path, folder)
    results["train_tokens_per_s_stream_over_memory"] = (
        results["streaming"]["tokens_per_s"] / results["in_memory"]["tokens_per_s"]
    )
    return results


def pipeline_only(corpus_path: Path, folder: Path, blocks: int = 4096) -> dict:
    """Blocks/s out of each pipeline, collated with MLM masking, no model."""
    from trainer.config import build_config
    from trainer.data.prepare import prepare_data
    from trainer.data.sampling import KeyedDataset
    from trainer.model.load import load_tokenizer
    from trainer.run.setup import train_stream
    from trainer.tasks.registry import TASKS

    class OneProcess:
        process_index, num_processes = 0, 1

    raw = base_config("mlm", corpus_path, folder, 1, MAX_LENGTH_MLM)
    raw["data"]["streaming"] = True
    cfg = build_config(raw, world_size=1)
    spec = TASKS["mlm"]
    tokenizer = load_tokenizer(cfg.model, spec)
    collate = spec.make_collator(tokenizer, cfg)
    stream = train_stream(cfg, spec, tokenizer, OneProcess())
    start = time.perf_counter()
    for _ in islice(stream.micro_batches(16, collate), blocks // 16):
        pass
    streamed = blocks / (time.perf_counter() - start)

    raw["data"]["streaming"] = False
    cfg = build_config(raw, world_size=1)
    data, _ = prepare_data(cfg, lambda: tokenizer)
    keyed = KeyedDataset(data.train[0], 0)
    order = [i % len(data.train[0]) for i in range(blocks)]
    start = time.perf_counter()
    for first in range(0, blocks, 16):
        collate([keyed[(0, i)] for i in order[first : first + 16]])
    in_memory = blocks / (time.perf_counter() - start)
    return {
        "stream_blocks_per_s": streamed,
        "memory_blocks_per_s": in_memory,
        "stream_over_memory": streamed / in_memory,
    }


# --- the section ---------------------------------------------------------------------------


def run(quick: bool, work_dir: Path) -> dict[str, Any]:
    """The three pairs; 20 steps per run on a 50,000-line corpus (`quick`: 6 on 5,000)."""
    steps, lines = (6, 5_000) if quick else (20, 50_000)
    corpus_path = corpus(lines, work_dir)
    print(f"[data_pipeline] {lines} corpus lines, {steps} steps per run ...", flush=True)
    return {
        "settings": {"steps": steps, "corpus_lines": lines},
        "cache": measure_cache(corpus_path, work_dir),
        "grouping": measure_grouping(work_dir, steps),
        "streaming": measure_streaming(corpus_path, work_dir, steps),
    }


CACHE = [
    ("case", lambda c: f"{c[0]} ({c[1]['status']})"),
    ("seconds", lambda c: fmt(c[1]["seconds"], 2)),
    ("blocks", lambda c: c[1]["blocks"]),
    ("tokens/s", lambda c: f"{c[1]['tokens_per_s']:,.0f}"),
]
GROUPING = [
    ("group_by_length", lambda c: c[0]),
    ("padding share", lambda c: f"{c[1]['pad_fraction']:.3f}"),
    ("median s/step", lambda c: fmt(c[1]["median_step_s"])),
    ("real tokens/s", lambda c: f"{c[1]['tokens_per_s']:,.0f}"),
    ("final loss", lambda c: fmt(c[1]["final_loss"])),
]
STREAMING = [
    ("data", lambda c: c[0]),
    ("median s/step", lambda c: fmt(c[1]["median_step_s"])),
    ("train tokens/s", lambda c: f"{c[1]['tokens_per_s']:,.0f}"),
    ("padding share", lambda c: f"{c[1]['pad_fraction']:.3f}"),
]


def markdown(result: dict[str, Any]) -> str:
    """A table per pair, each with its ratio."""
    cache, grouping, streaming = result["cache"], result["grouping"], result["streaming"]
    pipe = streaming["pipeline_only"]
    cases = [(case, cache[case]) for case in ("cold", "hit", "off")]
    grouped = [(case, grouping[case]) for case in ("off", "on")]
    streamed = [(case, streaming[case]) for case in ("in_memory", "streaming")]
    return "\n".join(
        [
            "## Data pipeline: tokenization cache, length grouping, streaming",
            "",
            f"{result['settings']['corpus_lines']} corpus lines, "
            f"{result['settings']['steps']} steps per run.",
            "",
            "### Tokenization: cold vs cached (MiniLM's tokenizer, MLM, 128-token blocks)",
            "",
            *column_table(CACHE, cases),
            "",
            f"A cache hit is **{cache['cold_over_hit']:.0f}x** faster than building the entry.",
            "",
            "### Length grouping (sentiment, IMDB-like lengths, max_length 256, batch 16)",
            "",
            *column_table(GROUPING, grouped),
            "",
            f"on / off: padding share x{grouping['pad_fraction_on_over_off']:.2f}, "
            f"step time x{grouping['step_time_on_over_off']:.2f}.",
            "",
            "### Streaming vs in-memory (MLM, all-MiniLM-L6-v2, 128-token blocks, batch 16)",
            "",
            *column_table(STREAMING, streamed),
            "",
            "Training tokens/s, streaming / in-memory: "
            f"x{streaming['train_tokens_per_s_stream_over_memory']:.2f}. The pipeline alone "
            f"(no model): stream {pipe['stream_blocks_per_s']:,.0f} blocks/s, in-memory "
            f"{pipe['memory_blocks_per_s']:,.0f} blocks/s (x{pipe['stream_over_memory']:.2f}).",
        ]
    )
