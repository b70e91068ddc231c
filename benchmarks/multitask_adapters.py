"""Adapters of different tasks on one base: the memory of N LoRA adapters (classification,
NER and masked LM, several per task) served by one `Predictor` against N separate
`Predictor.load`s, and whether each adapter's predictions are the same both ways.

The adapters are short LoRA runs (`trainer train`, a few steps each, different seeds) on
all-MiniLM-L6-v2 with the shipped data: memory does not depend on how well they are
trained. Each way loads in a fresh process (the worker "multitask") that reports the bytes
of its distinct parameter storages (shared tensors counted once: what a GPU holds) and the
RSS and PSS its loading added; the process's peak RSS is read from outside
(`common.run_measured`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import engine
from benchmarks.common import ROOT, fmt, run_worker, table
from benchmarks.models import build_bert, model_path

DATA = {
    "classification": str(ROOT / "data" / "sentiment" / "train.csv"),
    "token-classification": str(ROOT / "data" / "ner" / "train.jsonl"),
    "mlm": str(ROOT / "data" / "text" / "general.txt"),
}
SHORT = {"classification": "sst", "token-classification": "ner", "mlm": "mlm"}
TEXTS = [
    "The ramen was bland and the pork was tough and fatty.",
    "Mary Robinson chaired a meeting of The Elders in Dublin.",
    "The [MASK] was great and the staff were friendly.",
]
MiB = 1024 * 1024


def train_adapters(work_dir: Path, base: str, per_task: int) -> dict[str, str]:
    """`per_task` short LoRA runs of each task on `base`; name -> final/ folder."""
    finals = {}
    for task, data in DATA.items():
        for seed in range(per_task):
            run_dir = work_dir / f"{SHORT[task]}-{seed}"
            settings = {
                "task": task,
                "model": {"name_or_path": base},
                "data": {"train": data, "validation": None, "max_length": 64},
                "train": {"max_steps": 2, "global_batch_size": 8, "micro_batch_size": 8},
                "peft": {"method": "lora"},
                "log": {"trackers": []},
            }
            settings["train"]["seed"] = seed
            engine.train(run_dir, settings)
            finals[run_dir.name] = str(run_dir / "final")
    return finals


def load_job(spec: dict) -> dict[str, Any]:
    """The worker "multitask": load `spec["adapters"]` one way (`shared`: one Predictor,
    `separate`: a Predictor each), then report parameter bytes, RSS and every adapter's
    predictions on TEXTS."""
    import time

    import peft  # noqa: F401 (imported before the baseline RSS, as loading would import it)
    import torch

    from trainer.inference import Predictor
    from trainer.model import shared_base

    names = list(spec["adapters"])
    before = _memory()
    start = time.perf_counter()
    if spec["way"] == "shared":
        first = Predictor.load(spec["adapters"][names[0]], adapter_name=names[0])
        for name in names[1:]:
            first.add_adapter(name, spec["adapters"][name])
        predictors = dict.fromkeys(names, first)
    else:
        predictors = {name: Predictor.load(folder) for name, folder in spec["adapters"].items()}
    load_s = time.perf_counter() - start
    models = {id(m): m for p in predictors.values() for m in p.models}
    backbones = [m.get_base_model().base_model for m in models.values()]
    rows = {}
    for name, predictor in predictors.items():
        if spec["way"] == "shared":
            predictor.use(name)
        rows[name] = predictor.predict(TEXTS)
    with torch.no_grad():  # every weight read once, as a server that has seen every token
        for model in models.values():
            for param in model.parameters():
                param.sum()
    after = _memory()
    return {
        "parameter_bytes": shared_base.parameter_bytes(list(models.values())),
        "base_bytes": _distinct_bytes(
            [p for b in backbones for n, p in b.named_parameters() if _frozen_base(n)]
        ),
        "task_models": len(models),
        "rss_bytes": after["Rss"] - before["Rss"],
        "pss_bytes": after["Pss"] - before["Pss"],
        "load_s": load_s,
        "rows": rows,
    }


def _frozen_base(name: str) -> bool:
    """Whether a backbone parameter is the base's own, not LoRA's nor an adapter's copy of
    a module it trains in full (peft's names: `lora_A`, `modules_to_save`)."""
    return "lora_" not in name and "modules_to_save" not in name


def _distinct_bytes(parameters: list) -> int:
    """Bytes of the distinct storages of `parameters` (a shared one once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in parameters}
    return sum(storages.values())


def _memory() -> dict[str, int]:
    """This process's resident (Rss) and proportional (Pss) memory in bytes, from Linux's
    /proc/self/smaps_rollup. Pss counts a page shared with another mapping by its share:
    transformers maps a safetensors file's pages in as the weights (copy-on-write), so N
    loads of one float32 file share its page cache where RSS counts it N times."""
    found = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss"):
            found[key] = int(value.split()[0]) * 1024
    return found


def _max_score_gap(shared: list[dict], separate: list[dict]) -> float:
    """The largest difference between any two corresponding scores of two row lists
    (probabilities, entity and fill scores), or inf where the rows' shape differs."""

    def scores(value: Any) -> list[float]:
        if isinstance(value, float):
            return [value]
        if isinstance(value, dict):
            return [s for key in sorted(value) for s in scores(value[key])]
        if isinstance(value, list):
            return [s for item in value for s in scores(item)]
        return []

    a, b = scores(shared), scores(separate)
    if len(a) != len(b) or json.dumps(shared).count(":") != json.dumps(separate).count(":"):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def bases(quick: bool, work_dir: Path, model: Path | None) -> dict[str, str]:
    """Name -> folder of each base measured: all-MiniLM-L6-v2, which ships no MLM head (its
    MLM adapters train and save a head of their own, the 30k-row decoder included), and,
    unless `quick`, a BERT of MiniLM's shape saved with its MLM head (random weights), whose
    MLM adapters are LoRA only. `model`: that one base instead."""
    if model is not None:
        return {Path(model).name: str(model)}
    found = {"all-MiniLM-L6-v2": model_path()}
    if not quick:
        folder = build_bert(work_dir / "bert-with-mlm-head", 6, 384, 12, 1536)
        found["MiniLM-shaped BERT with its MLM head"] = str(folder)
    return found


def run(quick: bool, work_dir: Path, model: Path | None = None) -> dict[str, Any]:
    """For each base, train the adapters (3 per task, `quick`: 1), then load them both ways
    in fresh processes."""
    found = {}
    for index, (name, base) in enumerate(bases(quick, work_dir, model).items()):
        folder = work_dir / f"base-{index}"
        folder.mkdir(exist_ok=True)
        print(f"[multitask_adapters] {name}: training, then loading both ways ...", flush=True)
        found[name] = measure_base(base, folder, 1 if quick else 3)
    return {"bases": found}


def measure_base(base: str, work_dir: Path, per_task: int) -> dict[str, Any]:
    """One base: its adapters, loaded shared and separately, and their predictions compared."""
    finals = train_adapters(work_dir, base, per_task)
    ways = {}
    for way in ("shared", "separate"):
        spec = {"way": way, "adapters": finals}
        measured, found = run_worker("multitask", spec, work_dir / f"load-{way}.log")
        ways[way] = {**found, "peak_rss_bytes": int(measured.peak_rss_mb * MiB)}
    shared, separate = ways["shared"].pop("rows"), ways["separate"].pop("rows")
    labels_equal = all(
        [r.get("label") for r in shared[name]] == [r.get("label") for r in separate[name]]
        for name in finals
    )
    return {
        "base": base,
        "adapters": list(finals),
        "ways": ways,
        "max_score_gap": {name: _max_score_gap(shared[name], separate[name]) for name in finals},
        "labels_equal": labels_equal,
    }


HEAD = ["way", "task models", "parameters MiB", "of which base", "heads + LoRA"]
HEAD += ["RSS added MiB", "PSS added MiB", "peak RSS MiB", "load s"]


def markdown(result: dict[str, Any]) -> str:
    """Per base: the two ways side by side, and the agreement of their predictions."""
    lines = ["## Adapters of 3 tasks on one base vs separate models", ""]
    lines += [
        "Parameters: distinct storages (shared tensors once), what a GPU would hold; base: "
        "the backbone's frozen weights. RSS / PSS added: after loading, predicting and reading "
        "every weight once, minus after the imports (PSS counts a page mapped twice once: "
        "transformers maps a float32 safetensors file in as the weights, so on a CPU separate "
        "loads of one file already share its page cache until a weight is converted or "
        "moved); peak RSS: the process's.",
    ]
    for name, found in result["bases"].items():
        ways = found["ways"]
        saved = 1 - ways["shared"]["parameter_bytes"] / ways["separate"]["parameter_bytes"]
        gap = max(found["max_score_gap"].values())
        lines += [
            "",
            f"### {name}: {len(found['adapters'])} adapters",
            "",
            f"Base `{found['base']}`; adapters {', '.join(found['adapters'])}.",
            "",
            *table(HEAD, [_row(way, ways[way]) for way in ways]),
            "",
            f"Parameter memory saved by sharing: {saved:.0%}. Largest score difference between "
            f"the two ways, over every adapter's predictions: {gap:.2e}; labels equal: "
            f"{found['labels_equal']}.",
        ]
    return "\n".join(lines) + "\n"


def _row(way: str, found: dict[str, Any]) -> list[str]:
    return [
        way,
        str(found["task_models"]),
        fmt(found["parameter_bytes"] / MiB, 1),
        fmt(found["base_bytes"] / MiB, 1),
        fmt((found["parameter_bytes"] - found["base_bytes"]) / MiB, 1),
        fmt(found["rss_bytes"] / MiB, 0),
        fmt(found["pss_bytes"] / MiB, 0),
        fmt(found["peak_rss_bytes"] / MiB, 0),
        fmt(found["load_s"], 1),
    ]
