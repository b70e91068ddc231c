"""The hardware limit: model FLOPs utilisation (MFU) of this engine vs a minimal hand-written
PyTorch loop on the same model and data.

What it measures
----------------
1. The device's peak: on CPU, the best of repeated, timed 2048 x 2048 fp32 matmuls in this
   process with torch's threads (measured before each job and after the last, the highest
   kept: a burst of other load only lowers it); on a GPU, the published dense bf16 peak by device
   name (H100 SXM 989, H100 PCIe 756, H200 989, A100 312 TFLOP/s), with a timed 8192 x 8192
   bf16 matmul for reference.
2. CLM on a GPT-2-style decoder (`_common.build_gpt2`: MiniLM's size, 6 layers, hidden 384,
   random weights, MiniLM's tokenizer) on packed 128-token blocks of data/text/domain.txt,
   batch 8, fp32:
   (a) ``ours``: the ``trainer train`` CLI in a fresh process; tokens/s from its
       metrics.jsonl (``tokens_per_s`` of each log window, the first window left out as
       warm-up; on a GPU also ``gpu_peak_mb``, the peak allocated memory);
   (b) ``handwritten``: this script re-run as ``--worker handwritten``: the same tokenizer
       and file, documents joined with EOS and cut into blocks, AutoModelForCausalLM,
       torch.optim.AdamW (fused where supported), ``model(input_ids, labels=input_ids)
       .loss``, backward, clipping 1.0, step, zero_grad; the same batch, steps, learning
       rate and warm-up, timed over the same windows.
   Tokens/s, MFU = tokens/s x FLOPs per token / peak, and ours / hand-written.
3. The same for MLM on all-MiniLM-L6-v2 (ours: configs/mlm-domain-adaptive-pretraining.yaml
   with overrides, token-level masking; hand-written: DataCollatorForLanguageModeling with
   mlm_probability 0.15 on packed 128-token blocks, AutoModelForMaskedLM).
4. With a GPU only: the same two comparisons at GPU scale, bf16 autocast, sdpa attention:
   GPT-2-124M (GPT2Config defaults, the tokenizer's 30,522-token vocabulary) CLM at
   sequence length 1024, batch 16, and BERT-base (BertConfig defaults) MLM at 512, batch
   32, on domain.txt repeated 40 times (an epoch holds ~36 batches); peak GPU memory
   (torch.cuda.max_memory_allocated) too. The issue's goal: >= 45% MFU for GPT-2-124M.
   On a GPU machine parts 2 and 3 still run on the CPU (the GPU hidden from them).

FLOPs per token (`train_flops_per_token`): 6N + 12 x layers x hidden x sequence length
(forward and backward, PaLM's appendix B), N = the non-embedding parameters plus the output
projection onto the vocabulary (vocab x hidden) once: a tied embedding is no extra matmul,
but the LM head is. These are *model* FLOPs: work a run skips (e.g. projecting only the
masked positions in MLM) still counts, which can put MFU above the hardware's utilisation.

How to run
----------
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/hardware.py            # ~5 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/hardware.py --quick    # ~2 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/hardware.py --work-dir /tmp/hw

Results go to benchmarks/results/<YYYY-MM-DD>-hardware.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py

from _common import (
    ROOT,
    build_gpt2,
    cpu_model,
    fmt,
    in_work_dir,
    machine_info,
    model_path,
    ratio,
    read_jsonl,
    run_measured,
    steady_throughput,
    write_results,
)

DOMAIN_TEXT = ROOT / "data" / "text" / "domain.txt"
SEED = 42
LR = 5e-5
WARMUP_RATIO = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
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

    name: str  # clm | mlm
    task: str  # the engine's task
    model: str  # a key of MODELS
    config: str  # the engine's run config (overridden below)
    max_length: int
    batch_size: int
    steps: int
    log_every: int  # the first window of this many steps is warm-up
    precision: str  # the engine's train.precision: no | bf16
    device: str  # cpu | cuda
    data_copies: int = 1  # domain.txt repeated this many times (one epoch >= a few batches)


CPU_JOBS = (
    Job("clm", "clm", "gpt2-minilm-size", "configs/clm-continued-pretraining.yaml",
        128, 8, 20, 2, "no", "cpu"),
    Job("mlm", "mlm", "all-MiniLM-L6-v2", "configs/mlm-domain-adaptive-pretraining.yaml",
        128, 8, 20, 2, "no", "cpu"),
)  # fmt: skip
GPU_JOBS = (
    Job("clm", "clm", "gpt2-124m", "configs/clm-continued-pretraining.yaml",
        1024, 16, 35, 5, "bf16", "cuda", data_copies=40),
    Job("mlm", "mlm", "bert-base", "configs/mlm-domain-adaptive-pretraining.yaml",
        512, 32, 35, 5, "bf16", "cuda", data_copies=40),
)  # fmt: skip
QUICK_STEPS = {"cpu": 4, "cuda": 15}  # CPU: one timed window of 2 steps, a smoke test


# --- the device's peak -----------------------------------------------------------------------


def published_peak_flops(device_name: str) -> float | None:
    """The published dense bf16 peak of a GPU by its name, or None when not in the table."""
    name = device_name.upper()
    for parts, peak in PUBLISHED_BF16_PEAKS:
        if all(part in name for part in parts):
            return peak
    return None


def matmul_flops(device: str = "cpu", dtype=None, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of the fastest of repeated `size`-square matmuls within about `seconds` (at
    least 3 timings; on a GPU each timing is 10 matmuls between synchronisations)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
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


def measured_peak_flops(device: str = "cpu", seconds: float = 3.0) -> float:
    """The peak FLOP/s that MFU divides by. CPU: the best timed 2048-square fp32 matmul in
    this process, with torch's threads. CUDA: the published dense bf16 peak of the device
    (a measured matmul sits below it), or, for a GPU not in the table, a timed 8192-square
    bf16 matmul."""
    import torch

    if not device.startswith("cuda"):
        return matmul_flops(device, torch.float32, 2048, seconds)
    published = published_peak_flops(torch.cuda.get_device_name(device))
    return published or matmul_flops(device, torch.bfloat16, 8192, seconds)


def peak_record(device: str, seconds: float) -> dict[str, Any]:
    """The peak with how it was found (and, on a GPU, the measured bf16 matmul beside it)."""
    import torch

    if device == "cpu":
        flops = measured_peak_flops("cpu", seconds)
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


def _layers_and_hidden(config) -> tuple[int, int]:
    """Layers and hidden size under either naming (num_hidden_layers / n_layer, ...)."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return layers, hidden


def flops_parameters(config, lm_head: bool = True) -> int:
    """N of 6N: the parameters that take part in a matmul per token. Counted on a model
    built on the meta device (no memory), without the embedding tables (lookups), plus the
    projection onto the vocabulary once when `lm_head` (tied to the input embedding or not).
    The head model is the masked-LM one for encoders (BERT: with its transform layer) and
    the causal-LM one otherwise; with `lm_head=False` the bare encoder/decoder (with BERT's
    pooler), for classification, whose classifier (hidden x labels) is negligible."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

    if not lm_head:
        auto = transformers.AutoModel
    elif type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", 0):
        auto = transformers.AutoModelForMaskedLM
    else:
        auto = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    output = model.get_output_embeddings() if lm_head else None
    left_out = {id(w) for w in embeddings} | ({id(output.weight)} if output is not None else set())
    n = sum(p.numel() for p in model.parameters() if id(p) not in left_out)
    return n + (output.weight.numel() if output is not None else 0)


def train_flops_per_token(config, seq_len: int, lm_head: bool = True) -> float:
    """Training FLOPs (forward + backward) per token: 6N + 12 x layers x hidden x seq_len,
    PaLM's appendix B convention (attention scores and values counted in full, causal or
    not). N: `flops_parameters` (non-embedding parameters + the LM head's vocab x hidden
    once). Works for GPT-2 (n_layer / n_embd) and BERT (num_hidden_layers / hidden_size)
    configs; BERT counts the MLM head, or with `lm_head=False` the encoder and pooler (the
    classification head is negligible)."""
    layers, hidden = _layers_and_hidden(config)
    return 6 * flops_parameters(config, lm_head) + 12 * layers * hidden * seq_len


# --- models and data ---------------------------------------------------------------------------


def build_bert_base(folder: Path) -> Path:
    """BERT-base (BertConfig defaults: 12 layers, hidden 768, 110M parameters) with random,
    seeded weights and all-MiniLM-L6-v2's tokenizer (the same 30,522-token vocabulary)."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


MODELS = {
    "gpt2-minilm-size": lambda folder: build_gpt2(folder),
    "all-MiniLM-L6-v2": lambda folder: Path(model_path()),
    "gpt2-124m": lambda folder: build_gpt2(folder, n_layer=12, n_embd=768, n_head=12),
    "bert-base": build_bert_base,
}


def model_folder(job: Job, work_dir: Path) -> Path:
    """The job's model folder (built into the work folder when it comes from a config)."""
    return MODELS[job.model](work_dir / "models" / job.model)


def data_file(job: Job, work_dir: Path) -> Path:
    """domain.txt, or domain.txt repeated `data_copies` times (GPU-sized blocks)."""
    if job.data_copies == 1:
        return DOMAIN_TEXT
    path = work_dir / f"domain-x{job.data_copies}.txt"
    if not path.is_file():
        path.write_text(DOMAIN_TEXT.read_text() * job.data_copies)
    return path


# --- our engine: the CLI in a fresh process ----------------------------------------------------


def our_overrides(job: Job, model: Path, data: Path, run_dir: Path, cache: Path) -> list[str]:
    """key=value overrides that pin what the comparison depends on."""
    overrides = [
        f"task={job.task}",
        f"model.name_or_path={model}",
        f"output_dir={run_dir}",
        f"data.train={data}",
        "data.validation=null",
        f"data.max_length={job.max_length}",
        f"data.cache_dir={cache}",
        f"train.global_batch_size={job.batch_size}",
        f"train.micro_batch_size={job.batch_size}",
        f"train.max_steps={job.steps}",
        f"train.lr={LR}",
        f"train.warmup_ratio={WARMUP_RATIO}",
        "train.scheduler=linear",
        f"train.weight_decay={WEIGHT_DECAY}",
        f"train.max_grad_norm={MAX_GRAD_NORM}",
        f"train.precision='{job.precision}'",  # quoted: bare `no` is YAML 1.1 for false
        f"train.seed={SEED}",
        "eval.every_steps=0",
        f"log.every_steps={job.log_every}",
        "log.trackers=[]",
    ]
    if job.task == "mlm":  # as DataCollatorForLanguageModeling: token-level masking
        overrides += [f"mlm.mask_probability={MLM_PROBABILITY}", "mlm.whole_word_masking=false"]
    return overrides


@contextlib.contextmanager
def device_for(job: Job) -> Iterator[None]:
    """Hide the GPU from a CPU job's process (the engine would otherwise take it)."""
    if job.device != "cpu":
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def run_ours(job: Job, model: Path, data: Path, work_dir: Path) -> dict[str, Any]:
    """`trainer train` in a fresh process; the numbers from its run directory (on a GPU
    metrics.jsonl carries the process's peak allocated memory)."""
    name = f"{job.device}-{job.name}-ours"
    run_dir = work_dir / name
    command = [sys.executable, "-m", "trainer", "train", str(ROOT / job.config)]
    command += our_overrides(job, model, data, run_dir, work_dir / "cache")
    with device_for(job):
        measured = run_measured(command, work_dir / f"{name}.log")
    records = read_jsonl(run_dir / "metrics.jsonl")
    windows = [r for r in records if "tokens" in r]  # training log windows
    return {
        **steady_throughput(windows),
        **asdict(measured),
        "peak_gpu_memory_mb": records[-1].get("gpu_peak_mb"),
        "final_loss": windows[-1]["loss"],
        "windows": windows,
    }


# --- the hand-written loop (runs in the worker process) ----------------------------------------


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


def shuffled_batches(blocks, batch_size: int, seed: int) -> Iterator:
    """Full batches of a fresh seeded permutation each epoch, epoch after epoch."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield blocks[order[start : start + batch_size]]


def adamw(model, lr: float):
    """torch's AdamW, fused where this torch and device have it (foreach otherwise)."""
    import torch

    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)


def handwritten_worker(job: Job, model_dir: Path, data: Path) -> dict[str, Any]:
    """A minimal training loop on the same blocks; log windows timed as the engine's."""
    import torch
    import transformers
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    transformers.logging.set_verbosity_error()
    torch.manual_seed(SEED)
    device = torch.device(job.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = packed_blocks(tokenizer, data, job.task, job.max_length)
    auto = (
        transformers.AutoModelForMaskedLM
        if job.task == "mlm"
        else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(model_dir, attn_implementation="sdpa").to(device)
    model.train()
    optimizer = adamw(model, LR)
    schedule = transformers.get_linear_schedule_with_warmup(
        optimizer, round(WARMUP_RATIO * job.steps), job.steps
    )
    masking = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MLM_PROBABILITY)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.precision == "bf16")
    batches = shuffled_batches(blocks, job.batch_size, SEED)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    windows, start = [], time.perf_counter()
    for step in range(1, job.steps + 1):
        ids = next(batches)
        if job.task == "mlm":
            batch = masking([{"input_ids": row} for row in ids.tolist()])
            inputs, labels = batch["input_ids"], batch["labels"]
        else:
            inputs = labels = ids
        with autocast:
            loss = model(input_ids=inputs.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % job.log_every == 0 or step == job.steps:
            loss_value = loss.item()  # a host sync, as the engine's log
            sync()
            steps = step - (windows[-1]["step"] if windows else 0)
            elapsed = time.perf_counter() - start
            tokens = steps * job.batch_size * job.max_length
            windows.append(
                {"step": step, "elapsed_s": elapsed, "tokens": tokens, "loss": loss_value}
            )
    return {
        "windows": windows,
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "attention": model.config._attn_implementation,
        "blocks": len(blocks),
        "torch_threads": torch.get_num_threads(),
        "peak_gpu_memory_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        ),
    }


def run_handwritten(job: Job, model: Path, data: Path, work_dir: Path) -> dict[str, Any]:
    """The hand-written loop in a fresh process; the numbers it wrote."""
    name = f"{job.device}-{job.name}-handwritten"
    out = work_dir / f"{name}.json"
    spec = {"job": asdict(job), "model": str(model), "data": str(data)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "handwritten"]
    command += ["--worker-out", str(out), "--spec", json.dumps(spec)]
    with device_for(job):
        measured = run_measured(command, work_dir / f"{name}.log")
    found = json.loads(out.read_text())
    windows = found.pop("windows")
    return {
        **steady_throughput(windows),
        **asdict(measured),
        "final_loss": windows[-1]["loss"],
        "windows": windows,
        **found,
    }


# --- one comparison ----------------------------------------------------------------------------


def compare(job: Job, work_dir: Path) -> dict[str, Any]:
    """Ours then hand-written on one job, with the FLOPs per token and the ratios (MFU is
    added by `run_section`, once the peak is final)."""
    from transformers import AutoConfig

    model, data = model_folder(job, work_dir), data_file(job, work_dir)
    config = AutoConfig.from_pretrained(model)
    layers, hidden = _layers_and_hidden(config)
    sides = {}
    for side, run_side in (("ours", run_ours), ("handwritten", run_handwritten)):
        print(f"[{job.device} {job.name}] {side}: {job.steps} steps ...", flush=True)
        sides[side] = run_side(job, model, data, work_dir)
        print(f"[{job.device} {job.name}] {side}: {sides[side]['tokens_per_s']:,.0f} tokens/s")
    return {
        "job": asdict(job),
        "model_folder": str(model),
        "layers": layers,
        "hidden": hidden,
        "vocab": config.vocab_size,
        "flops_parameters": flops_parameters(config),
        "flops_per_token": train_flops_per_token(config, job.max_length),
        "attention_flops_per_token": 12 * layers * hidden * job.max_length,
        **sides,
    }


def add_mfu(result: dict[str, Any], peak: float) -> None:
    """MFU of both sides and the ratios ours / hand-written."""
    for side in ("ours", "handwritten"):
        found = result[side]
        found["mfu"] = found["tokens_per_s"] * result["flops_per_token"] / peak
    ours, hand = result["ours"], result["handwritten"]
    result["ratio_ours_over_handwritten"] = {
        key: ratio(ours[key], hand[key]) for key in ("tokens_per_s", "mfu", "wall_s")
    }


def run_section(jobs: tuple[Job, ...], device: str, quick: bool, work_dir: Path) -> dict:
    """The peak measured before each job and after the last (the highest kept: other load
    only lowers it), each job's comparison, and MFU against that peak."""
    seconds = 1.5 if quick else 3.0
    if quick:
        jobs = tuple(replace(job, steps=QUICK_STEPS[job.device]) for job in jobs)
    samples, results = [], {}
    for job in jobs:
        samples.append(peak_record(device, seconds))
        results[job.name] = compare(job, work_dir)
    samples.append(peak_record(device, seconds))
    peak = max(samples, key=lambda p: p["flops"])
    for result in results.values():
        add_mfu(result, peak["flops"])
    return {"peak": peak, "peak_samples": [p["flops"] for p in samples], "jobs": results}


def run(quick: bool, work_dir: Path) -> dict:
    """Every measurement of this section: the CPU comparisons always, the GPU ones when
    CUDA is available. JSON-serialisable."""
    import torch

    work_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "seed": SEED,
        "lr": LR,
        "warmup_ratio": WARMUP_RATIO,
        "scheduler": "linear",
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM,
        "mlm_probability": MLM_PROBABILITY,
        "data": str(DOMAIN_TEXT.relative_to(ROOT)),
    }
    result: dict[str, Any] = {"quick": quick, "settings": settings}
    result["cpu"] = run_section(CPU_JOBS, "cpu", quick, work_dir)
    if torch.cuda.is_available():
        result["gpu"] = run_section(GPU_JOBS, "cuda", quick, work_dir)
    else:
        result["gpu"] = {"skipped": "no GPU"}
    return result


# --- report -----------------------------------------------------------------------------------

MODEL_NAMES = {
    "gpt2-minilm-size": "GPT-2-style, MiniLM's size",
    "all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
    "gpt2-124m": "GPT-2-124M",
    "bert-base": "BERT-base",
}


def summary_table(jobs: dict[str, dict]) -> list[str]:
    """A row per job: shape, FLOPs per token, tokens/s and MFU of both sides."""
    lines = [
        "| job | model (N for 6N) | seq x batch | MFLOP/token | tokens/s ours | tokens/s "
        "hand-written | MFU ours | MFU hand-written | ours / hand-written |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in jobs.items():
        job, ours, hand = r["job"], r["ours"], r["handwritten"]
        model = f"{MODEL_NAMES[job['model']]} ({r['flops_parameters'] / 1e6:.1f}M)"
        lines.append(
            f"| {name.upper()} | {model} | {job['max_length']} x {job['batch_size']} | "
            f"{r['flops_per_token'] / 1e6:.1f} | {ours['tokens_per_s']:,.0f} | "
            f"{hand['tokens_per_s']:,.0f} | {ours['mfu']:.1%} | {hand['mfu']:.1%} | "
            f"{fmt(r['ratio_ours_over_handwritten']['tokens_per_s'], 2)} |"
        )
    return lines


DETAIL_ROWS = [
    ("timed steps (after the warm-up window)", lambda s: f"{s['timed_steps']}"),
    ("timed seconds", lambda s: fmt(s["timed_s"], 1)),
    ("last logged loss", lambda s: fmt(s["final_loss"], 3)),
    ("wall time of the whole job (s)", lambda s: fmt(s["wall_s"], 1)),
    ("peak RSS (MB)", lambda s: fmt(s["peak_rss_mb"], 0)),
    ("peak GPU memory (MiB)", lambda s: fmt(s.get("peak_gpu_memory_mb"), 0)),
    ("load average before / after", lambda s: f"{s['load_before']:.2f} / {s['load_after']:.2f}"),
]


def detail_table(jobs: dict[str, dict]) -> list[str]:
    """Per job and side: what was timed, the loss, the whole job, memory and load."""
    names = list(jobs)
    header = " | ".join(f"{n.upper()} ours | {n.upper()} hand-written" for n in names)
    lines = [f"| measure | {header} |", "|---|" + "---:|" * (2 * len(names))]
    for label, cell in DETAIL_ROWS:
        cells = [cell(jobs[n][side]) for n in names for side in ("ours", "handwritten")]
        if any(c != "n/a" for c in cells):  # peak GPU memory: CPU runs have none
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def flops_text(flops: float) -> str:
    """FLOP/s in G or T."""
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"


def section_lines(section: dict) -> list[str]:
    """One device's peak, summary and details."""
    peak = section["peak"]
    lines = [
        f"Peak: **{flops_text(peak['flops'])}** on {peak['device']} ({peak['source']}; "
        "measured before each job and after the last: "
        + ", ".join(flops_text(flops) for flops in section["peak_samples"])
        + ", the highest kept)."
    ]
    if "measured_bf16_matmul_flops" in peak:
        lines[-1] += (
            f" Measured 8192x8192 bf16 matmul: {flops_text(peak['measured_bf16_matmul_flops'])}"
            f" ({peak['measured_bf16_matmul_flops'] / peak['flops']:.0%} of the peak)."
        )
    lines += ["", *summary_table(section["jobs"]), "", *detail_table(section["jobs"])]
    return lines


def markdown(result: dict) -> list[str]:
    """This section of the results file, from its "## ..." heading."""
    cpu = result["cpu"]
    any_job = next(iter(cpu["jobs"].values()))["handwritten"]
    lines = [
        "## Hardware limit: MFU of our engine vs a hand-written PyTorch loop",
        "",
        "Model FLOPs utilisation = tokens/s x training FLOPs per token / the device's peak. "
        "FLOPs per token = 6N + 12 x layers x hidden x sequence length (forward + backward; "
        "attention as in PaLM's appendix B), N = non-embedding parameters + the output "
        "projection onto the vocabulary once (a tied embedding is no extra matmul, the LM "
        "head is). Both sides train the same model on the same packed blocks of "
        f"`{result['settings']['data']}` for the same steps, batch, learning rate "
        f"({result['settings']['lr']:g}, linear warm-up {result['settings']['warmup_ratio']:g}) "
        "and clipping (1.0), each in a fresh process: ours is the `trainer train` CLI "
        "(tokens/s from metrics.jsonl), the hand-written loop is `model(...).loss`, "
        "backward, clip, AdamW "
        + ("(fused)" if any_job.get("fused_adamw") else "(foreach)")
        + " step. The first log window of each run is warm-up and left out of tokens/s."
        + (" Quick mode: few steps, so the numbers are noisier." if result["quick"] else ""),
        "",
    ]
    lines += ["### CPU (fp32)", "", *section_lines(cpu)]
    gpu = result["gpu"]
    lines += ["", "### GPU (bf16 autocast, sdpa attention)", ""]
    if "skipped" in gpu:
        lines.append(f"Not run: {gpu['skipped']}.")
    else:
        lines += section_lines(gpu)
        clm = gpu["jobs"]["clm"]["ours"]["mfu"]
        verdict = "meets" if clm >= GPU_GOAL_MFU else "misses"
        lines += ["", f"GPT-2-124M at 1024: our MFU {clm:.1%} {verdict} the goal of "
                  f"{GPU_GOAL_MFU:.0%}."]  # fmt: skip
    lines += ["", "Notes:", ""] + [f"- {note}" for note in notes(result)]
    return lines


def notes(result: dict) -> list[str]:
    """What to keep in mind when reading the numbers."""
    found = [
        "MLM MFU counts *model* FLOPs: the LM head projects every position onto the "
        "vocabulary (6N includes vocab x hidden). A loss that projects only the masked "
        "positions (~15%) does less work for the same loss, so its MFU rises above the "
        "hardware's actual utilisation.",
        "The MLM head's transform layer starts random on all-MiniLM-L6-v2 (the checkpoint is "
        "the encoder alone); GPT-2-style and BERT-base models are random from their configs "
        "(MiniLM's tokenizer, 30,522 tokens). Throughput does not depend on the weights.",
        "Ours masks at token level here (mlm.whole_word_masking=false), as "
        "DataCollatorForLanguageModeling does; both use fused AdamW, ours without weight "
        "decay on biases and norms, the hand-written one decays everything.",
        "On CPU the peak is a measured matmul, not a datasheet figure, and other processes "
        "share the cores: compare ours with hand-written (measured back to back), and "
        "check the load averages.",
    ]
    if result["quick"]:
        found.append("Quick mode: a handful of timed steps per run.")
    return found


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (--worker, --worker-out, --spec and the trailing CLI arguments are
    internal: the two sides' processes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per run (~2 min)")
    parser.add_argument("--work-dir", type=Path, help="keep run folders here (default: tmp)")
    parser.add_argument("--worker", choices=["handwritten"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """The hand-written loop's process: run it and write what the parent reads."""
    spec = json.loads(args.spec)
    found = handwritten_worker(Job(**spec["job"]), Path(spec["model"]), Path(spec["data"]))
    args.worker_out.write_text(json.dumps(found))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write results/<date>-hardware.{md,json} (or, with --worker,
    one side's run)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.chdir(ROOT)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    result = in_work_dir(args.work_dir, "hardware-", lambda folder: run(args.quick, folder))
    machine = machine_info()
    m = machine
    header = [
        f"# Hardware limit: MFU ({m['date']})",
        "",
        "Generated by `benchmarks/hardware.py" + (" --quick" if args.quick else "") + "`.",
        "",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads)"
        f", GPU: {m['gpu'] or 'none'}",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"datasets {m['datasets']}, accelerate {m['accelerate']}",
        "",
    ]
    report = {"machine": machine, **result}
    text = "\n".join(header + markdown(result)) + "\n"
    print(f"wrote {write_results(report, 'hardware', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
