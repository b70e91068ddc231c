"""How our engine's training throughput scales with processes, sequence length and model
size, on CPU: MLM on packed blocks of data/text/domain.txt, `trainer train` in fresh
processes, a metrics.jsonl record per step, the first step left out as warm-up.

The models are BERTs built from all-MiniLM-L6-v2's config with random weights (6 layers /
hidden 384 is MiniLM's shape). One reference run (6 / 384, max_length 128, batch 8, one
process with a torch thread per core) is shared by the three tables.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import engine
from benchmarks.common import ROOT, column_table, fmt, load_warning, ratio, steady_throughput
from benchmarks.models import build_bert

CORPUS = "data/text/domain.txt"
BATCH = 8
SIZES = {"L2-H128": (2, 128), "L4-H256": (4, 256), "L6-H384": (6, 384)}  # layers, hidden
LENGTHS = (64, 128, 256)
QUICK_SKIPS = {"L4-H256", 256}  # left out in quick mode


@dataclass(frozen=True)
class RunSpec:
    """One training run: which model, how long the blocks, how many processes."""

    size: str = "L6-H384"
    max_length: int = 128
    processes: int = 1

    @property
    def name(self) -> str:
        """Names the run's folder and log, and keys it in the results."""
        return f"{self.size}-len{self.max_length}-{self.processes}p"


def run(quick: bool, work_dir: Path) -> dict[str, Any]:
    """Every run of the three tables (the reference run once) and their ratios; `quick`: 3
    steps instead of 6, no max_length 256 and no 4 / 256 model."""
    steps = 3 if quick else 6
    sizes = [size for size in SIZES if not (quick and size in QUICK_SKIPS)]
    lengths = [n for n in LENGTHS if not (quick and n in QUICK_SKIPS)]
    models = {size: build_model(size, work_dir) for size in sizes}
    specs = [RunSpec(), RunSpec(processes=2)]
    specs += [RunSpec(max_length=n) for n in lengths] + [RunSpec(size=size) for size in sizes]
    runs = {spec.name: train_once(spec, steps, work_dir) for spec in dict.fromkeys(specs)}
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


def build_model(size: str, work_dir: Path) -> dict[str, Any]:
    """One size's model folder (heads of 32 dimensions, as MiniLM's; FFN 4 x hidden) and
    its parameter counts, as `num_parameters()` counts them (the MLM decoder is tied to the
    word embeddings), with and without the embeddings."""
    from transformers import AutoModelForMaskedLM

    layers, hidden = SIZES[size]
    folder = build_bert(work_dir / "models" / size, layers, hidden, hidden // 32, 4 * hidden)
    model = AutoModelForMaskedLM.from_pretrained(folder)
    embedding = sum(p.numel() for n, p in model.named_parameters() if ".embeddings." in n)
    total = model.num_parameters()
    return {
        "folder": str(folder),
        "layers": layers,
        "hidden": hidden,
        "parameters": total,
        "non_embedding_parameters": total - embedding,
    }


def train_once(spec: RunSpec, steps: int, work_dir: Path) -> dict[str, Any]:
    """Train once in a fresh process (or two: `torchrun`, gloo DDP, the same global batch,
    the cores split between the processes) and read its throughput from metrics.jsonl."""
    threads = max(1, (os.cpu_count() or 1) // spec.processes)
    data = {"train": str(ROOT / CORPUS), "max_length": spec.max_length}
    train = {"max_steps": steps, "global_batch_size": BATCH, "lr": 1e-4, "seed": 42}
    settings = {
        "task": "mlm",
        "model": {"name_or_path": str(work_dir / "models" / spec.size)},
        "data": {**data, "cache_dir": str(work_dir / "cache")},
        "train": {**train, "micro_batch_size": BATCH // spec.processes},
        "log": {"every_steps": 1, "trackers": []},
    }
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    print(f"[scaling] {spec.name}: {steps} steps ...", flush=True)
    run = engine.train(
        work_dir / spec.name,
        settings,
        env=[f"OMP_NUM_THREADS={threads}"],
        launcher=launcher if spec.processes > 1 else (),
    )
    return {
        **asdict(spec),
        "threads_per_process": threads,
        "micro_batch": BATCH // spec.processes,
        "tokens_per_step": BATCH * spec.max_length,
        **steady_throughput(run.windows),
        "wall_s": run.measured.wall_s,
        "loads": [run.measured.load_before, run.measured.load_after],
        "final_loss": run.windows[-1]["loss"],
    }


PROCESSES = [
    ("processes", lambda r: r["processes"]),
    ("threads each", lambda r: r["threads_per_process"]),
    ("micro batch", lambda r: r["micro_batch"]),
    ("step time (s)", lambda r: fmt(r["step_s"])),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
    ("× vs 1 process", lambda r: fmt(r["vs"], 2)),
]
LENGTHS_TABLE = [
    ("max_length", lambda r: r["max_length"]),
    ("tokens/step", lambda r: f"{r['tokens_per_step']:,}"),
    ("step time (s)", lambda r: fmt(r["step_s"])),
    ("step time × vs shortest", lambda r: fmt(r["vs"], 2)),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
]
SIZES_TABLE = [
    ("model", lambda r: f"{r['layers']} layers / hidden {r['hidden']}"),
    ("parameters", lambda r: f"{r['parameters'] / 1e6:.2f}M"),
    ("non-embedding", lambda r: f"{r['non_embedding_parameters'] / 1e6:.2f}M"),
    ("step time (s)", lambda r: fmt(r["step_s"])),
    ("× step time vs smallest", lambda r: fmt(r["vs"], 2)),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
]


def table_items(result: dict[str, Any]) -> tuple[list[dict], list[dict], list[dict]]:
    """The runs of each table, each with its ratio ("vs") to the table's first run."""
    runs, one = result["runs"], result["runs"][result["processes"]["one"]]
    processes = [
        {**r, "vs": ratio(r["tokens_per_s"], one["tokens_per_s"])}
        for r in (one, runs[result["processes"]["two"]])
    ]
    lengths = [
        {**runs[row["run"]], "vs": row["step_s_over_shortest"]}
        for row in result["sequence_length"].values()
    ]
    sizes = [{**runs[row["run"]], **result["models"][s]} for s, row in result["model_size"].items()]
    sizes = [{**r, "vs": ratio(r["step_s"], sizes[0]["step_s"])} for r in sizes]
    return processes, lengths, sizes


def markdown(result: dict[str, Any]) -> str:
    """Settings, then the processes, sequence-length and model-size tables."""
    s, runs = result["settings"], result["runs"]
    processes, lengths, sizes = table_items(result)
    one = processes[0]
    return "\n".join(
        [
            "## Training throughput scaling (our engine, CPU)",
            "",
            f"MLM on `{s['corpus']}` packed blocks, `trainer train` in fresh processes, "
            f"{s['steps']} steps per run, the first left out as warm-up (step time and "
            "tokens/s over the rest, from metrics.jsonl; start-up and saving not included). "
            "Models: BERTs built from all-MiniLM-L6-v2's config with random weights (6 layers "
            f"/ 384 = MiniLM's shape). Reference run, shared by the tables: 6 / 384, max_length"
            f" 128, batch {s['batch']}, 1 process with {one['threads_per_process']} torch "
            "threads." + (" Quick mode: fewer steps and points." if s["quick"] else ""),
            *load_warning([max(r["loads"]) for r in runs.values()]),
            "",
            "### Processes (same global batch, same cores)",
            "",
            *column_table(PROCESSES, processes),
            "",
            "2 processes: `torchrun --standalone --nproc_per_node 2`, gloo DDP, "
            "`OMP_NUM_THREADS` = cores / 2 each; the gradients are all-reduced every step.",
            "",
            f"### Sequence length (batch {s['batch']}, 6 / 384, 1 process)",
            "",
            *column_table(LENGTHS_TABLE, lengths),
            "",
            f"### Model size (max_length 128, batch {s['batch']}, 1 process)",
            "",
            *column_table(SIZES_TABLE, sizes),
            "",
            "Non-embedding leaves out the token, position and token-type embeddings. The MLM "
            "head projects the masked positions onto the 30,522-token vocabulary and every "
            "step updates the whole embedding matrix (AdamW): work that grows with the "
            "vocabulary, not the encoder, which is why step time grows less than the "
            "non-embedding parameters.",
        ]
    )
