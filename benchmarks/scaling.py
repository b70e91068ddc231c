"""How our engine's training throughput scales with processes, sequence length and model
size, on CPU.

What it measures
----------------
Every run is MLM training with the ``trainer train`` CLI (``python -m trainer``) in a
fresh process, on data/text/domain.txt packed into blocks of ``data.max_length`` tokens
(15% of tokens selected, 80/10/10, no whole-word masking), fp32, AdamW, lr 1e-4, seed 42,
no validation, no checkpoints (only the final save, after the timed loop), a
metrics.jsonl record every step (``log.every_steps=1``). Throughput comes from those
records: the first record (the first step: allocations, first-touch of the weights) is
warm-up and left out; step time = (elapsed at the last record - elapsed at the first) /
steps in between, tokens/s = the tokens of those steps (each record's ``tokens_per_s`` x
its seconds; packed blocks have no padding) / the same seconds. Start-up, data preparation
and model loading are not in either number (the whole job's wall time is recorded apart).

The models are BERTs built from all-MiniLM-L6-v2's config (``BertConfig``, vocabulary
30,522, intermediate size 4 x hidden, 32 dimensions per attention head, random weights,
``AutoModelForMaskedLM.from_config``) and saved with MiniLM's tokenizer in the work folder;
the 6-layer / hidden-384 one has exactly all-MiniLM-L6-v2's shape. The MLM head projects
every position onto the whole vocabulary, so at these sizes it is a large share of the work.

The reference run, shared by all three tables: the 6-layer / 384 model, max_length 128,
batch 8 (global = micro, no accumulation), 1 process with as many torch threads as
cores (``OMP_NUM_THREADS``: 2 on a 2-core machine).

a) ``processes``: the reference run vs ``torchrun --standalone --nproc_per_node 2`` (CPU,
   gloo DDP) with the same global batch (8: micro batch 4 on each process) and
   ``OMP_NUM_THREADS`` = cores / 2 per process (1 on a 2-core machine), so both use the
   same cores. Held fixed: model, max_length, global batch, steps, learning rate (so the
   same optimization); what changes is how the cores split the work. tokens/s counts
   both processes' tokens; ratio 2p / 1p.
b) ``sequence_length``: max_length 64, 128, 256 at the same batch size (8 blocks per
   step, so 2x the tokens per step at each doubling): step time, tokens/s and the growth
   of step time vs 64 (2.0 at 128 and 4.0 at 256 would be linear in tokens; attention
   adds a term quadratic in length).
c) ``model_size``: 2 layers / hidden 128, 4 / 256, 6 / 384, max_length 128, batch 8:
   step time, tokens/s, parameters (as ``num_parameters()`` counts them: the MLM decoder is
   tied to the word embeddings) and non-embedding parameters (without the token, position
   and token-type embeddings).

Quick mode (``--quick``) runs 3 steps (2 timed) instead of 6 (5 timed) and leaves out
max_length 256 and the 4 / 256 model. With so few steps and other processes on the CPU
the numbers are indicative: the 1-minute load average before and after each run is
recorded.

How to run
----------
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scaling.py            # ~4 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scaling.py --quick    # ~2 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scaling.py --work-dir /tmp/scaling

Results go to benchmarks/results/<YYYY-MM-DD>-scaling.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py

from _common import (
    ROOT,
    fmt,
    in_work_dir,
    load_warning,
    machine_info,
    model_path,
    ratio,
    read_jsonl,
    run_measured,
    steady_throughput,
    write_results,
)

CORPUS = "data/text/domain.txt"
BATCH = 8
REFERENCE_LENGTH = 128
HEAD_DIM = 32  # all-MiniLM-L6-v2's (384 / 12 heads)
SIZES = {"L2-H128": (2, 128), "L4-H256": (4, 256), "L6-H384": (6, 384)}  # layers, hidden
REFERENCE_SIZE = "L6-H384"
LENGTHS = (64, 128, 256)
QUICK_SKIPS = {"L4-H256", 256}  # left out in quick mode


@dataclass(frozen=True)
class RunSpec:
    """One training run: which model, how long the blocks, how many processes."""

    size: str = REFERENCE_SIZE
    max_length: int = REFERENCE_LENGTH
    processes: int = 1

    @property
    def name(self) -> str:
        """Names the run's folder, config and log, and keys it in the results."""
        return f"{self.size}-len{self.max_length}-{self.processes}p"


# --- models built from config ----------------------------------------------------------------


def build_bert(folder: Path, layers: int, hidden: int) -> dict[str, int]:
    """A random BERT with MiniLM's vocabulary and tokenizer, saved to `folder` (reused when
    there); returns its parameter counts. Seeded, so every build is the same model."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig

    config = BertConfig.from_pretrained(model_path())
    config.update(
        {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": hidden // HEAD_DIM,
            "intermediate_size": 4 * hidden,
            "architectures": ["BertForMaskedLM"],
        }
    )
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config)
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(model_path()).save_pretrained(folder)
    embedding = sum(p.numel() for n, p in model.named_parameters() if ".embeddings." in n)
    total = model.num_parameters()
    return {"parameters": total, "non_embedding_parameters": total - embedding}


# --- one run of the CLI ----------------------------------------------------------------------


def write_config(spec: RunSpec, steps: int, model_dir: Path, work_dir: Path) -> Path:
    """The run's YAML: MLM on the corpus, no validation, a record per step."""
    import yaml

    raw = {
        "task": "mlm",
        "output_dir": str(work_dir / "runs" / spec.name),
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(ROOT / CORPUS),
            "max_length": spec.max_length,
            "cache_dir": str(work_dir / "cache"),
        },
        "train": {
            "max_steps": steps,
            "global_batch_size": BATCH,
            "micro_batch_size": BATCH // spec.processes,
            "lr": 1e-4,
            "seed": 42,
        },
        "log": {"every_steps": 1, "trackers": []},
    }
    path = work_dir / f"{spec.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def command_for(spec: RunSpec, config: Path) -> tuple[list[str], int]:
    """The command (threads set through `env`, so `run_measured` needs no environment
    argument) and the torch threads each process gets: all cores, split between processes."""
    threads = max(1, (os.cpu_count() or 1) // spec.processes)
    command = ["env", f"OMP_NUM_THREADS={threads}", sys.executable]
    if spec.processes > 1:
        command += ["-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(spec.processes)]
    return [*command, "-m", "trainer", "train", str(config)], threads


def run_one(spec: RunSpec, steps: int, model_dir: Path, work_dir: Path) -> dict[str, Any]:
    """Train once in a fresh process (or two) and read its throughput from metrics.jsonl."""
    shutil.rmtree(work_dir / "runs" / spec.name, ignore_errors=True)  # a kept --work-dir
    config = write_config(spec, steps, model_dir, work_dir)
    command, threads = command_for(spec, config)
    print(f"[scaling] {spec.name}: {steps} steps ...", flush=True)
    measured = run_measured(command, work_dir / f"{spec.name}.log")
    records = [
        r for r in read_jsonl(work_dir / "runs" / spec.name / "metrics.jsonl") if "loss" in r
    ]
    result = {
        "name": spec.name,
        **asdict(spec),
        "threads_per_process": threads,
        "batch": BATCH,
        "micro_batch": BATCH // spec.processes,
        "tokens_per_step": BATCH * spec.max_length,
        **steady_throughput(records),
        "wall_s": measured.wall_s,
        "load_before": measured.load_before,
        "load_after": measured.load_after,
        "final_loss": records[-1]["loss"],
    }
    print(f"[scaling] {spec.name}: {result['tokens_per_s']:,.0f} tokens/s", flush=True)
    return result


# --- the three tables ------------------------------------------------------------------------


def run(quick: bool, work_dir: Path) -> dict:
    """Every run of the three tables (the reference run once, shared) and their ratios."""
    work_dir = work_dir.resolve()
    steps = 3 if quick else 6
    sizes = [size for size in SIZES if not (quick and size in QUICK_SKIPS)]
    lengths = [n for n in LENGTHS if not (quick and n in QUICK_SKIPS)]
    models = {size: build_model(size, work_dir) for size in sizes}
    specs = [RunSpec(), RunSpec(processes=2)]
    specs += [RunSpec(max_length=n) for n in lengths] + [RunSpec(size=size) for size in sizes]
    runs: dict[str, dict] = {}
    for spec in specs:
        if spec.name not in runs:  # the reference run serves all three tables
            model_dir = work_dir / "models" / f"bert-{spec.size}"
            runs[spec.name] = run_one(spec, steps, model_dir, work_dir)
    one, two = runs[RunSpec().name], runs[RunSpec(processes=2).name]
    shortest = runs[RunSpec(max_length=lengths[0]).name]
    return {
        "settings": {"quick": quick, "steps": steps, "batch": BATCH, "corpus": CORPUS},
        "models": models,
        "runs": runs,
        "processes": {
            "one": RunSpec().name,
            "two": RunSpec(processes=2).name,
            "tokens_per_s_2p_over_1p": ratio(two["tokens_per_s"], one["tokens_per_s"]),
            "step_s_2p_over_1p": ratio(two["step_s"], one["step_s"]),
        },
        "sequence_length": {
            str(n): {
                "run": RunSpec(max_length=n).name,
                "step_s_over_shortest": ratio(
                    runs[RunSpec(max_length=n).name]["step_s"], shortest["step_s"]
                ),
            }
            for n in lengths
        },
        "model_size": {size: {"run": RunSpec(size=size).name} for size in sizes},
    }


def build_model(size: str, work_dir: Path) -> dict[str, int]:
    """Build (or reuse) one size's model folder; its shape and parameter counts."""
    layers, hidden = SIZES[size]
    counts = build_bert(work_dir / "models" / f"bert-{size}", layers, hidden)
    return {"layers": layers, "hidden": hidden, **counts}


# --- report ------------------------------------------------------------------------------------


def load_note(result: dict) -> list[str]:
    """A warning when another process was using the CPU around a run."""
    return load_warning([max(r["load_before"], r["load_after"]) for r in result["runs"].values()])


def processes_table(result: dict) -> list[str]:
    """a) 1 process vs 2, same global batch."""
    p = result["processes"]
    one, two = result["runs"][p["one"]], result["runs"][p["two"]]
    lines = [
        "| processes | threads each | micro batch | step time (s) | tokens/s | × vs 1 process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run_ in (one, two):
        lines.append(
            f"| {run_['processes']} | {run_['threads_per_process']} | {run_['micro_batch']} | "
            f"{fmt(run_['step_s'])} | {run_['tokens_per_s']:,.0f} | "
            f"{fmt(ratio(run_['tokens_per_s'], one['tokens_per_s']), 2)} |"
        )
    return lines


def length_table(result: dict) -> list[str]:
    """b) step time and tokens/s per max_length, batch 8."""
    lines = [
        "| max_length | tokens/step | step time (s) | step time × vs shortest | tokens/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, row in result["sequence_length"].items():
        r = result["runs"][row["run"]]
        lines.append(
            f"| {n} | {r['tokens_per_step']:,} | {fmt(r['step_s'])} | "
            f"{fmt(row['step_s_over_shortest'], 2)} | {r['tokens_per_s']:,.0f} |"
        )
    return lines


def size_table(result: dict) -> list[str]:
    """c) step time, tokens/s and parameters per model size, max_length 128, batch 8."""
    lines = [
        "| model | parameters | non-embedding | step time (s) | × step time vs smallest "
        "| tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sizes = result["model_size"]
    smallest = result["runs"][next(iter(sizes.values()))["run"]]
    for size, row in sizes.items():
        r, m = result["runs"][row["run"]], result["models"][size]
        lines.append(
            f"| {m['layers']} layers / hidden {m['hidden']} | {m['parameters'] / 1e6:.2f}M | "
            f"{m['non_embedding_parameters'] / 1e6:.2f}M | {fmt(r['step_s'])} | "
            f"{fmt(ratio(r['step_s'], smallest['step_s']), 2)} | {r['tokens_per_s']:,.0f} |"
        )
    return lines


def markdown(result: dict) -> list[str]:
    """The section: settings, then the processes, sequence-length and model-size tables."""
    s = result["settings"]
    reference = result["runs"][result["processes"]["one"]]
    lines = [
        "## Training throughput scaling (our engine, CPU)",
        "",
        f"MLM on `{s['corpus']}` packed blocks, `trainer train` in fresh processes, "
        f"{s['steps']} steps per run, the first left out as warm-up (step time and tokens/s "
        "over the rest, from metrics.jsonl; start-up and saving not included). Models: BERTs "
        "built from all-MiniLM-L6-v2's config with random weights (6 layers / 384 = MiniLM's "
        f"shape). Reference run, shared by the tables: 6 / 384, max_length 128, batch "
        f"{s['batch']}, 1 process with {reference['threads_per_process']} torch threads."
        + (" Quick mode: fewer steps and points." if s["quick"] else ""),
    ]
    lines += load_note(result)
    lines += ["", "### Processes (same global batch, same cores)", ""]
    lines += processes_table(result)
    lines += [
        "",
        "2 processes: `torchrun --standalone --nproc_per_node 2`, gloo DDP, "
        "`OMP_NUM_THREADS` = cores / 2 each; the gradients are all-reduced every step.",
        "",
        f"### Sequence length (batch {s['batch']}, 6 / 384, 1 process)",
        "",
    ]
    lines += length_table(result)
    lines += ["", f"### Model size (max_length 128, batch {s['batch']}, 1 process)", ""]
    lines += size_table(result)
    lines += [
        "",
        "Parameters as `num_parameters()` counts them (the MLM decoder is tied to the word "
        "embeddings); non-embedding leaves out the token, position and token-type embeddings. "
        "The MLM head projects the masked positions (15%) onto the 30,522-token vocabulary "
        "(hidden x 30,522 multiply-adds each), and every step updates the whole embedding "
        "matrix (AdamW): work that grows with the vocabulary, not the encoder, which is why "
        "step time grows less than the non-embedding parameters.",
    ]
    return lines


# --- command line ------------------------------------------------------------------------------


def main() -> None:
    """Run the section alone and write results/<date>-scaling.{md,json}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps per run, fewer points")
    parser.add_argument("--work-dir", type=Path, help="keep run folders here (default: tmp)")
    args = parser.parse_args()
    result = in_work_dir(args.work_dir, "scaling-", lambda folder: run(args.quick, folder))
    machine = machine_info()
    report = {"machine": machine, **result}
    title = f"# Training throughput scaling ({machine['date']})"
    header = [
        title,
        "",
        f"Generated by `benchmarks/scaling.py{' --quick' if args.quick else ''}`. "
        f"{machine['cpu']}, {machine['cpu_cores']} cores, GPU: {machine['gpu'] or 'none'}; "
        f"torch {machine['torch']}, transformers {machine['transformers']}, "
        f"accelerate {machine['accelerate']}.",
        "",
    ]
    path = write_results(report, "scaling", "\n".join(header + markdown(result)) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
