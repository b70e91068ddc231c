"""The hardware limit: model FLOPs utilisation (MFU) of our engine vs a minimal hand-written
PyTorch loop on the same model, data, batch, steps, learning rate and clipping, each side in
a fresh process, back to back.

MFU = tokens/s x training FLOPs per token / the device's peak. The peak: on CPU the best
timed 2048-square fp32 matmul in this process, measured before each job and after the last
(the highest kept: other load only lowers it); on a GPU the published dense bf16 peak. CPU
jobs always run (the GPU hidden from them); GPU-scale jobs (GPT-2-124M at 1024, BERT-base at
512, bf16) only where CUDA is available.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import engine
from benchmarks.common import ROOT, cpu_model, fmt, ratio, run_worker, steady_throughput, table
from benchmarks.models import build_bert, build_gpt2, model_path

DOMAIN_TEXT = ROOT / "data" / "text" / "domain.txt"
LR, WARMUP_RATIO, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 5e-5, 0.1, 0.01, 1.0, 42
MLM_PROBABILITY = 0.15
GPU_GOAL_MFU = 0.45  # the goal for GPT-2-124M at sequence length 1024

# Published dense bf16 tensor-core peaks (no sparsity), FLOP/s, by substrings of the name
# torch reports; the first entry whose substrings all occur wins (PCIe / NVL before SXM).
PUBLISHED_BF16_PEAKS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),  # also GH200
    (("A100",), 312e12),
)


@dataclass(frozen=True)
class Job:
    """One comparison: a model, a task and the shape of every step, for both sides."""

    name: str  # clm | mlm (also the engine's task)
    model: str  # a key of MODELS
    config: str  # the engine's run config (overridden below)
    max_length: int
    batch_size: int
    steps: int
    log_every: int  # the first window of this many steps is warm-up
    precision: str  # the engine's train.precision: no | bf16
    device: str  # cpu | cuda
    data_copies: int = 1  # domain.txt repeated this many times (one epoch >= a few batches)


CLM_CONFIG = "configs/clm-continued-pretraining.yaml"
MLM_CONFIG = "configs/mlm-domain-adaptive-pretraining.yaml"
CPU_JOBS = (
    Job("clm", "gpt2-minilm-size", CLM_CONFIG, 128, 8, 20, 2, "no", "cpu"),
    Job("mlm", "all-MiniLM-L6-v2", MLM_CONFIG, 128, 8, 20, 2, "no", "cpu"),
)
GPU_JOBS = (
    Job("clm", "gpt2-124m", CLM_CONFIG, 1024, 16, 35, 5, "bf16", "cuda", data_copies=40),
    Job("mlm", "bert-base", MLM_CONFIG, 512, 32, 35, 5, "bf16", "cuda", data_copies=40),
)
QUICK_STEPS = {"cpu": 4, "cuda": 15}  # CPU: one timed window of 2 steps, a smoke test
MODELS = {  # name: (what the tables call it, its folder, built in `folder` where needed)
    "gpt2-minilm-size": ("GPT-2-style, MiniLM's size", build_gpt2),
    "all-MiniLM-L6-v2": ("all-MiniLM-L6-v2", lambda folder: Path(model_path())),
    "gpt2-124m": ("GPT-2-124M", lambda folder: build_gpt2(folder, 12, 768, 12)),
    "bert-base": ("BERT-base", lambda folder: build_bert(folder, 12, 768, 12, 3072)),
}


# --- the device's peak -----------------------------------------------------------------------


def published_peak_flops(device_name: str) -> float | None:
    """The published dense bf16 peak of a GPU by its name, or None when not in the table."""
    name = device_name.upper()
    found = (peak for parts, peak in PUBLISHED_BF16_PEAKS if all(p in name for p in parts))
    return next(found, None)


def matmul_flops(device: str = "cpu", dtype=None, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of the fastest of repeated `size`-square matmuls within about `seconds` (at
    least 3 timings; on a GPU each timing is 10 matmuls between synchronisations)."""
    import torch

    a, b = (torch.randn(size, size, device=device, dtype=dtype or torch.float32) for _ in "ab")
    per_timing = 10 if device.startswith("cuda") else 1
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)  # warm-up: kernels chosen, caches filled
    sync()
    best, timings, start = float("inf"), 0, time.perf_counter()
    while timings < 3 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        for _ in range(per_timing):
            torch.mm(a, b)
        sync()
        best = min(best, (time.perf_counter() - began) / per_timing)
        timings += 1
    return 2 * size**3 / best


def peak_record(device: str, seconds: float) -> dict[str, Any]:
    """The peak MFU divides by, with how it was found. CPU: the best timed 2048-square fp32
    matmul with torch's threads. CUDA: the published dense bf16 peak (a measured matmul sits
    below it; a timed 8192-square bf16 one is kept beside it, and used for a GPU not in the
    table)."""
    import torch

    if device == "cpu":
        flops = matmul_flops("cpu", torch.float32, 2048, seconds)
        source = f"measured: best 2048x2048 fp32 matmul, {torch.get_num_threads()} torch threads"
        return {"device": cpu_model(), "flops": flops, "source": source}
    name = torch.cuda.get_device_name(0)
    measured = matmul_flops("cuda", torch.bfloat16, 8192, seconds)
    published = published_peak_flops(name)
    return {
        "device": name,
        "flops": published or measured,
        "source": "published dense bf16" if published else "measured (not in the table)",
        "measured_bf16_matmul_flops": measured,
    }


# --- FLOPs per token -------------------------------------------------------------------------


def flops_parameters(config) -> int:
    """N of 6N: the parameters that take part in a matmul per token. Counted on a model
    built on the meta device (no memory), without the embedding tables (lookups), plus the
    projection onto the vocabulary once (tied to the input embedding or not: a tied
    embedding is no extra matmul, but the LM head is). The masked-LM model for encoders
    (BERT: with its transform layer), the causal-LM one otherwise."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", 0)
    auto = transformers.AutoModelForMaskedLM if encoder else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    output = model.get_output_embeddings()
    left_out = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in left_out | {id(output.weight)})
    return n + output.weight.numel()


def layers_and_hidden(config) -> tuple[int, int]:
    """Layers and hidden size under either naming (BERT's or GPT-2's)."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return layers, getattr(config, "hidden_size", None) or config.n_embd


def train_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6N + 12 x layers x hidden x seq_len,
    PaLM's appendix B (attention scores and values counted in full, causal or not); N is
    `flops_parameters`."""
    layers, hidden = layers_and_hidden(config)
    return 6 * flops_parameters(config) + 12 * layers * hidden * seq_len


# --- the two sides -----------------------------------------------------------------------------


def run_ours(job: Job, model: Path, data: Path, work_dir: Path) -> dict[str, Any]:
    """`trainer train` on the job's config with what the comparison depends on pinned."""
    data = {"train": str(data), "validation": None, "max_length": job.max_length}
    train = {"global_batch_size": job.batch_size, "micro_batch_size": job.batch_size}
    train |= {"max_steps": job.steps, "lr": LR, "warmup_ratio": WARMUP_RATIO, "seed": SEED}
    train |= {"scheduler": "linear", "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM}
    settings = {
        "task": job.name,
        "model": {"name_or_path": str(model)},
        "data": {**data, "cache_dir": str(work_dir / "cache")},
        "train": {**train, "precision": job.precision},
        "eval": {"every_steps": 0},
        "log": {"every_steps": job.log_every, "trackers": []},
    }
    if job.name == "mlm":  # as DataCollatorForLanguageModeling: token-level masking
        settings["mlm"] = {"mask_probability": MLM_PROBABILITY, "whole_word_masking": False}
    run_dir = work_dir / f"{job.device}-{job.name}-ours"
    run = engine.train(run_dir, settings, ROOT / job.config, env=hidden_gpu(job))
    windows = run.windows
    return {
        **steady_throughput(windows),
        **asdict(run.measured),
        "peak_gpu_memory_mb": windows[-1].get("gpu_peak_mb"),
        "final_loss": windows[-1]["loss"],
    }


def hidden_gpu(job: Job) -> list[str]:
    """A CPU job's process gets no GPU (the engine would otherwise take it)."""
    return ["CUDA_VISIBLE_DEVICES="] if job.device == "cpu" else []


def run_handwritten(job: Job, model: Path, data: Path, work_dir: Path) -> dict[str, Any]:
    """The hand-written loop (the worker "handwritten") in a fresh process."""
    spec = {"job": asdict(job), "model": str(model), "data": str(data)}
    log = work_dir / f"{job.device}-{job.name}-handwritten.log"
    measured, found = run_worker("handwritten", spec, log, env=hidden_gpu(job))
    windows = found.pop("windows")
    throughput = steady_throughput(windows)
    return {**throughput, **asdict(measured), "final_loss": windows[-1]["loss"], **found}


def packed_blocks(tokenizer, path: Path, task: str, length: int):
    """One document per non-blank line, as the engine reads a .txt: CLM joins documents with
    EOS, MLM keeps each one's [CLS] ... [SEP]; concatenated and cut into full blocks."""
    import torch

    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if task == "clm":
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [t for doc in encoded for t in [*doc, tokenizer.eos_token_id]]
    else:
        ids = [t for doc in tokenizer(texts)["input_ids"] for t in doc]
    usable = len(ids) // length * length
    return torch.tensor(ids[:usable]).view(-1, length)


def training_batches(tokenizer, blocks, job: Job) -> Iterator:
    """(inputs, labels) of full batches of a fresh seeded permutation each epoch, epoch
    after epoch; MLM masks them as DataCollatorForLanguageModeling does."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    masking = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MLM_PROBABILITY)
    generator = torch.Generator().manual_seed(SEED)
    while True:
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order) - job.batch_size + 1, job.batch_size):
            ids = blocks[order[start : start + job.batch_size]]
            if job.name == "clm":
                yield ids, ids
            else:
                batch = masking([{"input_ids": row} for row in ids.tolist()])
                yield batch["input_ids"], batch["labels"]


def handwritten_loop(spec: dict) -> dict[str, Any]:
    """The worker "handwritten": `model(...).loss`, backward, clip, AdamW step, schedule
    step, zero_grad on the same blocks; log windows timed as the engine's (a host sync at
    each, as the engine's log)."""
    import torch
    import transformers

    job, model_dir = Job(**spec["job"]), Path(spec["model"])
    transformers.logging.set_verbosity_error()
    torch.manual_seed(SEED)
    device = torch.device(job.device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    blocks = packed_blocks(tokenizer, Path(spec["data"]), job.name, job.max_length)
    auto = transformers.AutoModelForMaskedLM if job.name == "mlm" else None
    auto = auto or transformers.AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, attn_implementation="sdpa").to(device).train()
    optimizer = adamw(model)
    warmup = round(WARMUP_RATIO * job.steps)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, warmup, job.steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.precision == "bf16")
    batches = training_batches(tokenizer, blocks, job)
    windows, start = [{"step": 0}], time.perf_counter()
    for step in range(1, job.steps + 1):
        inputs, labels = next(batches)
        with autocast:
            loss = model(input_ids=inputs.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % job.log_every == 0 or step == job.steps:
            tokens = (step - windows[-1]["step"]) * job.batch_size * job.max_length
            record = {"step": step, "loss": loss.item(), "tokens": tokens}
            windows.append({**record, "elapsed_s": time.perf_counter() - start})
    cuda = device.type == "cuda"
    return {
        "windows": windows[1:],
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def adamw(model):
    """torch's AdamW, fused where this torch and device have it (foreach otherwise)."""
    import torch

    try:
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


# --- the section -------------------------------------------------------------------------------


def compare(job: Job, work_dir: Path) -> dict[str, Any]:
    """Ours then hand-written on one job, with the FLOPs per token (MFU is added once the
    peak is final)."""
    from transformers import AutoConfig

    model = MODELS[job.model][1](work_dir / "models" / job.model)
    data = DOMAIN_TEXT
    if job.data_copies > 1:
        data = work_dir / f"domain-x{job.data_copies}.txt"
        data.write_text(DOMAIN_TEXT.read_text() * job.data_copies)
    config = AutoConfig.from_pretrained(model)
    sides = {}
    for side, run_side in (("ours", run_ours), ("handwritten", run_handwritten)):
        print(f"[hardware] {job.device} {job.name} {side}: {job.steps} steps ...", flush=True)
        sides[side] = run_side(job, model, data, work_dir)
    return {
        "job": asdict(job),
        "flops_parameters": flops_parameters(config),
        "flops_per_token": train_flops_per_token(config, job.max_length),
        **sides,
    }


def run_device(jobs: tuple[Job, ...], device: str, quick: bool, work_dir: Path) -> dict:
    """The peak measured before each job and after the last (the highest kept), each job's
    comparison, and MFU of both sides against that peak."""
    if quick:
        jobs = tuple(replace(job, steps=QUICK_STEPS[job.device]) for job in jobs)
    samples, results = [], {}
    for job in jobs:
        samples.append(peak_record(device, 1.5 if quick else 3.0))
        results[job.name] = compare(job, work_dir)
    samples.append(peak_record(device, 1.5 if quick else 3.0))
    peak = max(samples, key=lambda p: p["flops"])
    for r in results.values():
        for side in ("ours", "handwritten"):
            r[side]["mfu"] = r[side]["tokens_per_s"] * r["flops_per_token"] / peak["flops"]
        keys = ("tokens_per_s", "mfu", "wall_s")
        r["ratio_ours_over_handwritten"] = {
            k: ratio(r["ours"][k], r["handwritten"][k]) for k in keys
        }
    return {"peak": peak, "peak_samples": [p["flops"] for p in samples], "jobs": results}


def run(quick: bool, work_dir: Path) -> dict[str, Any]:
    """The CPU comparisons always, the GPU ones where CUDA is available."""
    import torch

    result: dict[str, Any] = {"quick": quick, "cpu": run_device(CPU_JOBS, "cpu", quick, work_dir)}
    cuda = torch.cuda.is_available()
    result["gpu"] = run_device(GPU_JOBS, "cuda", quick, work_dir) if cuda else {"skipped": "no GPU"}
    return result


def flops_text(flops: float) -> str:
    """FLOP/s in G or T."""
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"


def device_lines(section: dict) -> list[str]:
    """One device's peak, a summary row per job, and the details of each side."""
    peak, jobs = section["peak"], section["jobs"]
    line = (
        f"Peak: **{flops_text(peak['flops'])}** on {peak['device']} ({peak['source']}; measured "
        "before each job and after the last: "
        + ", ".join(flops_text(flops) for flops in section["peak_samples"])
        + ", the highest kept)."
    )
    if "measured_bf16_matmul_flops" in peak:
        measured = peak["measured_bf16_matmul_flops"]
        share = measured / peak["flops"]
        line += (
            f" Measured 8192x8192 bf16 matmul: {flops_text(measured)} ({share:.0%} of the peak)."
        )
    summary = [
        [name.upper(), f"{MODELS[r['job']['model']][0]} ({r['flops_parameters'] / 1e6:.1f}M)"]
        + [f"{r['job']['max_length']} x {r['job']['batch_size']}"]
        + [f"{r['flops_per_token'] / 1e6:.1f}"]
        + [f"{r[s]['tokens_per_s']:,.0f}" for s in ("ours", "handwritten")]
        + [f"{r[s]['mfu']:.1%}" for s in ("ours", "handwritten")]
        + [fmt(r["ratio_ours_over_handwritten"]["tokens_per_s"], 2)]
        for name, r in jobs.items()
    ]
    sides = [(n, s) for n in jobs for s in ("ours", "handwritten")]
    details = [
        [label, *(cell(jobs[n][s]) for n, s in sides)]
        for label, cell in DETAIL_ROWS
        if any(cell(jobs[n][s]) != "n/a" for n, s in sides)  # GPU memory: not on CPU
    ]
    head = ["job", "model (N for 6N)", "seq x batch", "MFLOP/token", "tokens/s ours"]
    head += ["tokens/s hand-written", "MFU ours", "MFU hand-written", "ours / hand-written"]
    columns = [f"{n.upper()} {s.replace('handwritten', 'hand-written')}" for n, s in sides]
    return [line, "", *table(head, summary), "", *table(["measure", *columns], details)]


DETAIL_ROWS = [
    ("timed steps (after the warm-up window)", lambda s: f"{s['timed_steps']}"),
    ("timed seconds", lambda s: fmt(s["timed_s"], 1)),
    ("last logged loss", lambda s: fmt(s["final_loss"], 3)),
    ("wall time of the whole job (s)", lambda s: fmt(s["wall_s"], 1)),
    ("peak RSS (MB)", lambda s: fmt(s["peak_rss_mb"], 0)),
    ("peak GPU memory (MiB)", lambda s: fmt(s.get("peak_gpu_memory_mb"), 0)),
    ("load average before / after", lambda s: f"{s['load_before']:.2f} / {s['load_after']:.2f}"),
]


def markdown(result: dict[str, Any]) -> str:
    """The definitions, then the CPU and the GPU results."""
    fused = next(iter(result["cpu"]["jobs"].values()))["handwritten"]["fused_adamw"]
    lines = [
        "## Hardware limit: MFU of our engine vs a hand-written PyTorch loop",
        "",
        "Model FLOPs utilisation = tokens/s x training FLOPs per token / the device's peak. "
        "FLOPs per token = 6N + 12 x layers x hidden x sequence length (forward + backward; "
        "attention as in PaLM's appendix B), N = non-embedding parameters + the output "
        "projection onto the vocabulary once. Both sides train the same model on the same "
        f"packed blocks of `data/text/domain.txt` for the same steps, batch, learning rate "
        f"({LR:g}, linear warm-up {WARMUP_RATIO:g}) and clipping ({MAX_GRAD_NORM}), each in a "
        "fresh process: ours is the `trainer train` CLI (tokens/s from metrics.jsonl), the "
        "hand-written loop is `model(...).loss`, backward, clip, AdamW "
        f"({'fused' if fused else 'foreach'}) step. The first log window of each run is "
        "warm-up and left out of tokens/s."
        + (" Quick mode: few steps, so the numbers are noisier." if result["quick"] else ""),
        "",
        "### CPU (fp32)",
        "",
        *device_lines(result["cpu"]),
        "",
        "### GPU (bf16 autocast, sdpa attention)",
        "",
    ]
    gpu = result["gpu"]
    if "skipped" in gpu:
        lines.append(f"Not run: {gpu['skipped']}.")
    else:
        clm = gpu["jobs"]["clm"]["ours"]["mfu"]
        verdict = "meets" if clm >= GPU_GOAL_MFU else "misses"
        lines += device_lines(gpu)
        lines.append(
            f"\nGPT-2-124M at 1024: our MFU {clm:.1%} {verdict} the goal of {GPU_GOAL_MFU:.0%}."
        )
    return "\n".join([*lines, "", "Notes:", "", *(f"- {note}" for note in NOTES)])


NOTES = (
    "MLM MFU counts *model* FLOPs: the LM head projects every position onto the vocabulary "
    "(6N includes vocab x hidden). Our MLM loss projects only the masked positions (~15%): "
    "less work for the same loss, so its MFU rises above the hardware's actual utilisation.",
    "The MLM head's transform layer starts random on all-MiniLM-L6-v2 (the checkpoint is the "
    "encoder alone); the GPT-2-style and BERT-base models are random from their configs "
    "(MiniLM's tokenizer, 30,522 tokens). Throughput does not depend on the weights.",
    "Ours masks at token level here (mlm.whole_word_masking=false), as "
    "DataCollatorForLanguageModeling does; both use fused AdamW, ours without weight decay on "
    "biases and norms, the hand-written one decays everything.",
    "On CPU the peak is a measured matmul, not a datasheet figure, and other processes share "
    "the cores: compare ours with hand-written (measured back to back), and check the load "
    "averages.",
)
