"""Each optimisation of the training step on its own: on vs off, same model, same data, in
this one process (fp32 unless the row says otherwise).

One optimizer step = forward + backward + clipping + AdamW on real data from the
repository, built from the engine's own functions where it has one. Both variants of a row
run alternately (a few steps of one, then of the other, several rounds, after warm-up) so
that a burst of other load hits both; each variant's figure is the median of its per-step
times, and the speed-up is off / on (above 1: the optimisation pays). bf16 autocast is
expected to lose on a CPU without AVX512-BF16 or AMX, where bf16 matmuls are emulated: the
results header says which kind of CPU ran.
"""

from __future__ import annotations

import contextlib
import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, column_table, fmt
from benchmarks.models import model_path

Step = Callable[[], None]


# --- timing --------------------------------------------------------------------------------


def alternate(variants: dict[str, Step], rounds: int, per_round: int, warmup: int = 1) -> dict:
    """Per-step times of each variant, run alternately; the median of each."""
    for step in variants.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "steps": len(t)} for name, t in times.items()}


def row(name: str, on: str, off: str, timed: dict, **extra: Any) -> dict:
    """A result row: both variants' medians and the speed-up off / on."""
    return {
        "name": name,
        "on": on,
        "off": off,
        "on_s": timed["on"]["median_s"],
        "off_s": timed["off"]["median_s"],
        "speedup": timed["off"]["median_s"] / timed["on"]["median_s"],
        "steps_each": timed["on"]["steps"],
        **extra,
    }


# --- the model and data --------------------------------------------------------------------


def mlm_batch(model_dir: str, batch_size: int):
    """`batch_size` packed 128-token blocks of domain.txt, masked by the engine's collator."""
    from transformers import AutoTokenizer

    from trainer.config import DataConfig, MlmConfig
    from trainer.data.collate import MaskedLMCollator
    from trainer.data.encode import pack_for_mlm
    from trainer.data.read import TEXT, read_split
    from trainer.data.sampling import KeyedDataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = read_split(str(ROOT / "data/text/domain.txt"), "data.train", TEXT, DataConfig())
    keyed = KeyedDataset(pack_for_mlm(split, tokenizer, 128), run_seed=0)
    return MaskedLMCollator(tokenizer, MlmConfig())([keyed[(0, i)] for i in range(batch_size)])


def train_step(model, optimizer, loss_of: Callable[[], Any], sync: bool = False) -> Step:
    """forward + backward + clip + update, the engine's order."""
    import torch

    def step() -> None:
        loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sync:
            loss.item()

    return step


def mlm_model(model_dir: str, attention: str = "sdpa"):
    """MiniLM with its MLM head (the head's transform starts random: not in the checkpoint)."""
    import torch
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_pretrained(model_dir, attn_implementation=attention)


def mlm_loss(model, batch, targets_only: bool = True, autocast: bool = False):
    """The engine's MLM loss (mean over targets) as a closure."""
    import torch

    from trainer.run.forward import forward
    from trainer.tasks.losses import token_loss

    def loss_of():
        context = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            output, labels = forward(model, batch, targets_only)
        loss_sum, count = token_loss(output["logits"], labels)
        return loss_sum / count

    return loss_of


def adamw(model, fused: bool):
    """AdamW as the engine builds it (fused) or with foreach kernels."""
    import torch

    from trainer.config import TrainConfig
    from trainer.run.optim import build_optimizer

    if fused:
        return build_optimizer(model, TrainConfig(lr=1e-5))
    return torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)


# --- the rows ------------------------------------------------------------------------------


def mlm_pair(quick: bool, model_dir: str, on: dict, off: dict) -> dict:
    """The MLM step in two variants, alternated: each a dict of `mlm_loss` keywords plus
    an optional `sync` for `train_step`. Returns the timings and the batch's shape."""
    batch = mlm_batch(model_dir, 8 if quick else 16)
    model = mlm_model(model_dir).train()
    optimizer = adamw(model, fused=True)
    steps = {}
    for name, variant in (("on", dict(on)), ("off", dict(off))):
        sync = variant.pop("sync", False)
        steps[name] = train_step(model, optimizer, mlm_loss(model, batch, **variant), sync)
    timed = alternate(steps, rounds=2 if quick else 3, per_round=2)
    targets = int((batch["labels"] != -100).sum())
    return {"timed": timed, "shape": list(batch["input_ids"].shape), "targets": targets}


def mlm_targets_only(quick: bool, model_dir: str) -> dict:
    """Output projection on masked positions vs on all of them."""
    pair = mlm_pair(quick, model_dir, {"targets_only": True}, {"targets_only": False})
    return row(
        "mlm_targets_only",
        "project masked positions",
        "project every position",
        pair["timed"],
        shape=pair["shape"],
        targets=pair["targets"],
    )


def sentiment_rows() -> list[dict]:
    """The rows of data/sentiment/train.csv."""
    with (ROOT / "data/sentiment/train.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def classifier_batch(model_dir: str, batch_size: int, max_length: int):
    """The first `batch_size` reviews of train.csv, padded to the longest."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [r["text"] for r in sentiment_rows()][:batch_size]
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    batch = {k: torch.tensor(v) for k, v in encoded.items()}
    batch["labels"] = torch.arange(batch_size) % 2
    return batch


def classifier(model_dir: str):
    """MiniLM with a fresh 2-label classification head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def classification_loss(model, batch):
    """Mean cross-entropy of the classifier on `batch` as a closure."""
    import torch.nn.functional as F

    from trainer.run.forward import model_inputs

    return lambda: F.cross_entropy(model(**model_inputs(batch)).logits, batch["labels"])


def fused_adamw(quick: bool, model_dir: str) -> dict:
    """The update alone, after one backward: fused vs foreach AdamW."""
    model = classifier(model_dir).train()
    batch = classifier_batch(model_dir, 16, 64)
    classification_loss(model, batch)().backward()  # gradients stay for every update
    optimizers = {"on": adamw(model, fused=True), "off": adamw(model, fused=False)}
    timed = alternate(
        {name: opt.step for name, opt in optimizers.items()},
        rounds=3 if quick else 5,
        per_round=3,
    )
    parameters = sum(p.numel() for p in model.parameters())
    return row("fused_adamw", "fused AdamW", "foreach AdamW", timed, parameters=parameters)


def sdpa_attention(quick: bool, model_dir: str) -> dict:
    """The MLM step with SDPA vs eager attention."""
    batch = mlm_batch(model_dir, 8 if quick else 16)
    steps = {}
    for name, attention in (("on", "sdpa"), ("off", "eager")):
        model = mlm_model(model_dir, attention).train()
        steps[name] = train_step(model, adamw(model, fused=True), mlm_loss(model, batch))
    timed = alternate(steps, rounds=2 if quick else 3, per_round=2)
    return row("sdpa_attention", "sdpa", "eager", timed)


def bf16_autocast(quick: bool, model_dir: str) -> dict:
    """The MLM step under bf16 autocast vs fp32 on this device (CPU)."""
    pair = mlm_pair(quick, model_dir, {"autocast": True}, {})
    return row("bf16_autocast", "bf16 autocast", "fp32", pair["timed"])


def host_sync(quick: bool, model_dir: str) -> dict:
    """The MLM step with a `.item()` after each step vs none."""
    pair = mlm_pair(quick, model_dir, {}, {"sync": True})
    return row("host_sync", "no per-step .item()", ".item() every step", pair["timed"])


def epoch_batches(grouped: str, lengths: list[int], batch_size: int) -> list[list[int]]:
    """One epoch of example indices in batches: the engine's random order, or grouped by
    length (`grouped` "on")."""
    from trainer.data.sampling import LENGTH_WINDOW_BATCHES, LengthGrouped, Shuffled

    ordering = Shuffled(len(lengths), seed=42)
    if grouped == "on":
        window = LENGTH_WINDOW_BATCHES * batch_size
        ordering = LengthGrouped(ordering, tuple(lengths), window, batch_size, seed=42)
    order = ordering.order(0)
    full = len(order) // batch_size * batch_size
    return [order[i : i + batch_size] for i in range(0, full, batch_size)]


def epoch_pass(model, optimizer, ids: list[list[int]], batches: list[list[int]]) -> dict:
    """Train on each batch (padded to its longest text): seconds, padding share, tokens/s."""
    import torch

    real = padded = 0
    start = time.perf_counter()
    for indices in batches:
        longest = max(len(ids[i]) for i in indices)
        input_ids = torch.tensor([ids[i] + [0] * (longest - len(ids[i])) for i in indices])
        labels = torch.tensor([i % 2 for i in indices])
        batch = {
            "input_ids": input_ids,
            "attention_mask": (input_ids != 0).long(),
            "labels": labels,
        }
        train_step(model, optimizer, classification_loss(model, batch))()
        real += sum(len(ids[i]) for i in indices)
        padded += input_ids.numel()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pad_fraction": 1 - real / padded, "tokens_per_s": real / seconds}


def length_grouping(quick: bool, model_dir: str) -> dict:
    """One epoch of sentiment batches, random vs grouped by length (`quick`: 8 batches)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = sentiment_rows()
    ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=64)["input_ids"]
    model = classifier(model_dir).train()
    optimizer = adamw(model, fused=True)
    batches = {g: epoch_batches(g, [len(i) for i in ids], 16) for g in ("on", "off")}
    batches = {g: b[:8] if quick else b for g, b in batches.items()}
    for chosen in batches.values():  # warm-up of both
        epoch_pass(model, optimizer, ids, chosen)
    on, off = (epoch_pass(model, optimizer, ids, batches[g]) for g in ("on", "off"))
    return {
        "name": "length_grouping",
        "on": "grouped by length",
        "off": "random batches",
        "on_s": on["seconds"] / len(batches["on"]),
        "off_s": off["seconds"] / len(batches["off"]),
        "speedup": on["tokens_per_s"] / off["tokens_per_s"],
        "steps_each": len(batches["on"]),
        "pad_fraction_on": on["pad_fraction"],
        "pad_fraction_off": off["pad_fraction"],
    }


def torch_compile(quick: bool, model_dir: str) -> dict:
    """Fixed-shape classification steps, torch.compile vs eager, and the compile time."""
    import torch

    batch = classifier_batch(model_dir, 16, 64)
    eager = classifier(model_dir).train()
    compiled_source = classifier(model_dir).train()
    compiled = torch.compile(compiled_source)
    steps = {
        "on": train_step(
            compiled, adamw(compiled_source, True), classification_loss(compiled, batch)
        ),
        "off": train_step(eager, adamw(eager, True), classification_loss(eager, batch)),
    }
    start = time.perf_counter()
    steps["on"]()  # compiles forward and backward
    compile_s = time.perf_counter() - start
    timed = alternate(steps, rounds=3, per_round=3)
    return row("torch_compile", "torch.compile", "eager", timed, compile_s=compile_s)


ROWS: dict[str, Callable[[bool, str], dict]] = {
    "mlm_targets_only": mlm_targets_only,
    "fused_adamw": fused_adamw,
    "sdpa_attention": sdpa_attention,
    "bf16_autocast": bf16_autocast,
    "length_grouping": length_grouping,
    "host_sync": host_sync,
    "torch_compile": torch_compile,
}
SLOW = ("torch_compile",)  # left out of --quick


# --- the section ---------------------------------------------------------------------------


def run(quick: bool, work_dir: Path, model: str | None = None) -> dict[str, Any]:
    """Every row on all-MiniLM-L6-v2 (or `model`, a BERT-style folder); `quick`: fewer
    steps and no torch.compile."""
    rows = []
    for name, measure in ROWS.items():
        if quick and name in SLOW:
            continue
        print(f"[optimisations] {name} ...", flush=True)
        rows.append(measure(quick, model or model_path()))
    return {"quick": quick, "rows": rows}


def notes(r: dict) -> str:
    """What a row adds to its times: padding shares, compile time, MLM targets."""
    found = []
    if "pad_fraction_on" in r:
        found.append(f"padding {r['pad_fraction_off']:.3f} → {r['pad_fraction_on']:.3f}")
    if "compile_s" in r:
        found.append(f"compile {r['compile_s']:.0f} s")
    if "targets" in r:
        found.append(f"{r['targets']} targets in {r['shape'][0]}×{r['shape'][1]} tokens")
    return "; ".join(found)


COLUMNS = [
    ("optimisation", lambda r: r["name"]),
    ("on", lambda r: r["on"]),
    ("off", lambda r: r["off"]),
    ("step on (s)", lambda r: fmt(r["on_s"])),
    ("step off (s)", lambda r: fmt(r["off_s"])),
    ("speed-up", lambda r: fmt(r["speedup"], 2)),
    ("notes", notes),
]


def markdown(result: dict[str, Any]) -> str:
    """A table: each optimisation, its step time on and off, and the speed-up."""
    return "\n".join(
        [
            "## Optimisations, one at a time (all-MiniLM-L6-v2, in one process)",
            "",
            "Median step time of each variant, run alternately; speed-up = off / on (length "
            "grouping: useful tokens/s on / off). See `benchmarks/optimisations.py` for each "
            "row.",
            "",
            *column_table(COLUMNS, result["rows"]),
        ]
    )
