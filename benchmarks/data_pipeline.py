"""The data pipeline: tokenization cold vs cached, padding and step time with and without
length grouping, streaming vs in-memory throughput. Each pair is measured in the same run.

What it measures
----------------
1. ``cache``: `prepare_data` (what `trainer prepare` and every run's set-up call) on an
   MLM corpus of ``--corpus-lines`` lines (data/text/domain.txt and the shipped reviews,
   shuffled and repeated), all-MiniLM-L6-v2's tokenizer, 128-token blocks: cold (read,
   check, tokenize, pack, write the cache entry), then again (a cache hit), then with the
   cache off (tokenizing in memory only, as before the cache existed). Seconds and
   tokens/s of each, and cold / hit.
2. ``grouping``: fine-tuning all-MiniLM-L6-v2 for sentiment on reviews whose lengths follow
   IMDB's distribution (log-normal word counts, median 174 words, sigma 0.75; texts built
   from sentences of data/sentiment/train.csv), max_length 256, batch 16, ``--steps``
   steps, `trainer train` in a fresh process with data.group_by_length off and on. The
   logged padding share, the training-loop seconds per step (from metrics.jsonl), real
   tokens/s, and on / off.
3. ``streaming``: MLM continued pretraining of all-MiniLM-L6-v2 on the corpus of (1),
   128-token blocks, batch 16, ``--steps`` steps, in-memory (from the cache) and with
   data.streaming (shuffle buffer 1000): training tokens/s and seconds per step; and the
   pipeline alone, without a model: blocks/s out of the stream (reading, tokenizing,
   packing, shuffling, collating with masking) and out of the in-memory dataset (lookup
   and collating with masking).

How to run
----------
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_pipeline.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_pipeline.py --steps 10 --corpus-lines 20000

Results go to benchmarks/results/<YYYY-MM-DD>-data-pipeline.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import tempfile
import time
from itertools import islice, pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fmt, machine_info, model_path, read_jsonl, run_measured, write_results

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


def write_config(folder: Path, name: str, raw: dict) -> Path:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def base_config(task: str, train: Path, folder: Path, steps: int, max_length: int) -> dict:
    return {
        "task": task,
        "output_dir": str(folder / "runs" / task),
        "model": {"name_or_path": model_path()},
        "data": {"train": str(train), "max_length": max_length, "cache_dir": str(folder / "cache")},
        "train": {
            "max_steps": steps,
            "global_batch_size": 16,
            "micro_batch_size": 16,
            "lr": 1e-4,
            "seed": 42,
        },
        "log": {"every_steps": 1, "trackers": []},
    }


# --- 1. cache ------------------------------------------------------------------------------


def measure_cache(corpus_path: Path, folder: Path) -> dict:
    import datasets

    from trainer.config import build_config
    from trainer.data.prepare import prepare_data
    from trainer.model.load import load_tokenizer

    datasets.disable_progress_bars()
    raw = base_config("mlm", corpus_path, folder, 1, MAX_LENGTH_MLM)
    results = {}
    shared = str(folder / "cache-bench")
    for case, cache_dir in (("cold", shared), ("hit", shared), ("off", None)):
        raw["data"]["cache_dir"] = cache_dir
        cfg = build_config(raw, world_size=1)
        start = time.perf_counter()
        data, _ = prepare_data(cfg, lambda cfg=cfg: load_tokenizer(cfg.model, cfg.task))
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


def run_training(config: Path, folder: Path, name: str) -> dict:
    measured = run_measured(
        [sys.executable, "-m", "trainer", "train", str(config)], folder / f"{name}.log"
    )
    records = [r for r in read_jsonl(_run_dir(config) / "metrics.jsonl") if "loss" in r]
    elapsed = [r["elapsed_s"] for r in records]
    step_s = [b - a for a, b in pairwise(elapsed)][1:]  # skip warm-up
    return {
        "wall_s": measured.wall_s,
        "load_before": measured.load_before,
        "median_step_s": statistics.median(step_s),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[2:]),
        "pad_fraction": statistics.mean(r["pad_fraction"] for r in records),
        "final_loss": records[-1]["loss"],
    }


def _run_dir(config: Path) -> Path:
    import yaml

    return Path(yaml.safe_load(config.read_text())["output_dir"])


def measure_grouping(folder: Path, steps: int) -> dict:
    reviews = imdb_like_reviews(steps * 16 + 64, folder)
    results = {}
    for grouped in (False, True):
        raw = base_config("classification", reviews, folder, steps, MAX_LENGTH_REVIEWS)
        raw["output_dir"] += f"-grouped-{grouped}"
        raw["data"]["group_by_length"] = grouped
        config = write_config(folder, f"grouping-{grouped}", raw)
        results["on" if grouped else "off"] = run_training(config, folder, f"grouping-{grouped}")
    off, on = results["off"], results["on"]
    results["step_time_on_over_off"] = on["median_step_s"] / off["median_step_s"]
    results["pad_fraction_on_over_off"] = on["pad_fraction"] / off["pad_fraction"]
    return results


def measure_streaming(corpus_path: Path, folder: Path, steps: int) -> dict:
    results = {}
    for streaming in (False, True):
        raw = base_config("mlm", corpus_path, folder, steps, MAX_LENGTH_MLM)
        raw["output_dir"] += f"-streaming-{streaming}"
        raw["data"]["streaming"] = streaming
        config = write_config(folder, f"streaming-{streaming}", raw)
        name = "streaming" if streaming else "in_memory"
        results[name] = run_training(config, folder, f"streaming-{streaming}")
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
    from trainer.run.train import train_stream
    from trainer.tasks.spec import TASKS

    class OneProcess:
        process_index, num_processes = 0, 1

    raw = base_config("mlm", corpus_path, folder, 1, MAX_LENGTH_MLM)
    raw["data"]["streaming"] = True
    cfg = build_config(raw, world_size=1)
    spec = TASKS["mlm"]
    tokenizer = load_tokenizer(cfg.model, cfg.task)
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


# --- report --------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    machine, cache, grouping, streaming = (
        report["machine"],
        report["cache"],
        report["grouping"],
        report["streaming"],
    )
    pipe = streaming["pipeline_only"]
    lines = [
        f"# Data pipeline, {machine['date']}",
        "",
        f"{machine['cpu']} ({machine['cpu_cores']} cores), torch {machine['torch']}, "
        f"transformers {machine['transformers']}, datasets {machine['datasets']}; "
        f"{report['settings']['corpus_lines']} corpus lines, {report['settings']['steps']} "
        "steps per run.",
        "",
        "## Tokenization: cold vs cached (all-MiniLM-L6-v2 tokenizer, MLM, 128-token blocks)",
        "",
        "| case | seconds | blocks | tokens/s |",
        "|---|---|---|---|",
    ]
    for case in ("cold", "hit", "off"):
        row = cache[case]
        lines.append(
            f"| {case} ({row['status']}) | {fmt(row['seconds'], 2)} | {row['blocks']} | "
            f"{row['tokens_per_s']:,.0f} |"
        )
    lines += [
        "",
        f"A cache hit is **{cache['cold_over_hit']:.0f}x** faster than building the entry.",
        "",
        "## Length grouping (sentiment, IMDB-like lengths, max_length 256, batch 16)",
        "",
        "| group_by_length | padding share | median s/step | real tokens/s | final loss |",
        "|---|---|---|---|---|",
    ]
    for case in ("off", "on"):
        row = grouping[case]
        lines.append(
            f"| {case} | {row['pad_fraction']:.3f} | {fmt(row['median_step_s'])} | "
            f"{row['tokens_per_s']:,.0f} | {fmt(row['final_loss'])} |"
        )
    lines += [
        "",
        f"on / off: padding share x{grouping['pad_fraction_on_over_off']:.2f}, "
        f"step time x{grouping['step_time_on_over_off']:.2f}.",
        "",
        "## Streaming vs in-memory (MLM, all-MiniLM-L6-v2, 128-token blocks, batch 16)",
        "",
        "| data | median s/step | train tokens/s | padding share |",
        "|---|---|---|---|",
    ]
    for case in ("in_memory", "streaming"):
        row = streaming[case]
        lines.append(
            f"| {case} | {fmt(row['median_step_s'])} | {row['tokens_per_s']:,.0f} | "
            f"{row['pad_fraction']:.3f} |"
        )
    lines += [
        "",
        f"Training tokens/s, streaming / in-memory: "
        f"x{streaming['train_tokens_per_s_stream_over_memory']:.2f}. The pipeline alone "
        f"(no model): stream {pipe['stream_blocks_per_s']:,.0f} blocks/s, in-memory "
        f"{pipe['memory_blocks_per_s']:,.0f} blocks/s (x{pipe['stream_over_memory']:.2f}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--corpus-lines", type=int, default=50_000, help="MLM corpus size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus_path = corpus(args.corpus_lines, folder)
        report = {
            "machine": machine_info(),
            "settings": {"steps": args.steps, "corpus_lines": args.corpus_lines},
            "cache": measure_cache(corpus_path, folder),
            "grouping": measure_grouping(folder, args.steps),
            "streaming": measure_streaming(corpus_path, folder, args.steps),
        }
    path = write_results(report, "data-pipeline", markdown(report))
    print(path.read_text())


if __name__ == "__main__":
    main()
