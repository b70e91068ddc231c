"""Shared fixtures: tiny models built once per session, small generated data files.

Everything is local and seeded: the tiny BERT / GPT-2 come from `tiny_models` (random
weights, tokenizers trained on a fixed corpus), the data files are generated from the same
vocabulary, so the numbers a test pins do not depend on anything outside this repository.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses some tests start

import torch

# The models here are tiny: one thread is as fast as several on an idle machine, and many
# times faster on a busy one, where intra-op threads oversubscribe the cores.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

POSITIVE = ("good", "great", "loved", "enjoyed", "amazing")
NEGATIVE = ("bad", "terrible", "hated", "boring", "awful")
NEUTRAL = [w for w in tiny_models.WORDS if w not in POSITIVE + NEGATIVE]
ENTITIES = {"Paris": "LOC", "London": "LOC", "Berlin": "LOC", "Alice": "PER", "Bob": "PER"}


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu`-marked tests need CUDA: without it they are skipped, saying so (they run in
    `make gpu-check`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (make gpu-check runs it on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- process-wide state: start every test from a clean slate ------------------------------


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """`Accelerator(...)` stores its settings in global singletons: reset them around every
    test so that one test's gradient accumulation or precision never leaks into the next."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Training installs SIGTERM/SIGUSR1 handlers in this process: put pytest's back."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


# --- tiny models ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with a MaskedLM head and its WordPiece tokenizer (seeded weights, so
    that pinned loss values do not depend on what ran before in the session)."""
    import torch

    torch.manual_seed(0)
    return tiny_models.build_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with its byte-level BPE tokenizer (seeded weights)."""
    torch.manual_seed(0)
    return tiny_models.build_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_chat(tmp_path_factory) -> Path:
    """A 2-layer Llama whose tokenizer has ChatML's special tokens and template (seeded)."""
    torch.manual_seed(0)
    return tiny_models.build_llama_chat(tmp_path_factory.mktemp("tiny-llama-chat"))


@pytest.fixture(scope="session")
def bert_tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


@pytest.fixture(scope="session")
def gpt2_tokenizer(tiny_gpt2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2)


# --- generated data ---------------------------------------------------------------------


def sentiment_rows(count: int, seed: int) -> list[dict]:
    """Sentences whose label is told by one sentiment word among neutral filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["negative", "positive"])
        words = rng.choices(NEUTRAL, k=rng.randint(3, 10))
        cue = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words.insert(rng.randint(0, len(words)), cue)
        rows.append({"text": " ".join(words) + " .", "label": label})
    return rows


def ner_rows(count: int, seed: int) -> list[dict]:
    """Word lists with PER/LOC/ORG entities (Acme Corp is a two-word ORG)."""
    rng = random.Random(seed)
    filler = [w for w in NEUTRAL if w not in ENTITIES and w not in ("Acme", "Corp")]
    rows = []
    for _ in range(count):
        tokens, tags = [], []
        for _ in range(rng.randint(4, 12)):
            pick = rng.random()
            if pick < 0.15:
                name = rng.choice(list(ENTITIES))
                tokens.append(name)
                tags.append(f"B-{ENTITIES[name]}")
            elif pick < 0.22:
                tokens += ["Acme", "Corp"]
                tags += ["B-ORG", "I-ORG"]
            else:
                tokens.append(rng.choice(filler))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Small train/validation files for every task, written once per session."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "text.txt").write_text("\n".join(tiny_models.corpus(300, seed=1)) + "\n")
    (folder / "text_validation.txt").write_text("\n".join(tiny_models.corpus(40, seed=2)) + "\n")
    write_csv(folder / "sentiment_train.csv", sentiment_rows(192, seed=3))
    write_csv(folder / "sentiment_validation.csv", sentiment_rows(48, seed=4))
    write_jsonl(folder / "ner_train.jsonl", ner_rows(192, seed=5))
    write_jsonl(folder / "ner_validation.jsonl", ner_rows(48, seed=6))
    return folder


# --- run configs ------------------------------------------------------------------------


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


TASK_FILES = {
    "mlm": ("text.txt", "text_validation.txt"),
    "clm": ("text.txt", "text_validation.txt"),
    "classification": ("sentiment_train.csv", "sentiment_validation.csv"),
    "token-classification": ("ner_train.jsonl", "ner_validation.jsonl"),
}


def make_run_config(
    folder: Path, task: str, models: dict[str, Path], data_folder: Path, **sections
) -> Path:
    """Write a small, fast run config for `task` on the tiny models into `folder` (the run
    goes to folder/run); `sections` update the defaults, e.g. train={"lr": 0.01}."""
    train_file, validation_file = TASK_FILES[task]
    raw = {
        "task": task,
        "output_dir": str(folder / "run"),
        "model": {"name_or_path": str(models["clm" if task == "clm" else "bert"])},
        "data": {
            "train": str(data_folder / train_file),
            "validation": str(data_folder / validation_file),
            "max_length": 32,
            "cache_dir": str(data_folder / "cache"),  # shared by the session's runs
        },
        "train": {
            "epochs": 1,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "seed": 0,
        },
        "eval": {"batch_size": 16},
        "log": {"every_steps": 1, "trackers": []},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return write_config(folder / f"{task}.yaml", raw)


@pytest.fixture(scope="session")
def tiny_models_by_task(tiny_bert, tiny_gpt2) -> dict[str, Path]:
    return {"bert": tiny_bert, "clm": tiny_gpt2}


@pytest.fixture
def run_config(tmp_path, tiny_models_by_task, data_dir):
    """`run_config(task, **section_updates)`: see make_run_config; the run goes to
    tmp_path/run."""

    def make(task: str, **sections) -> Path:
        return make_run_config(tmp_path, task, tiny_models_by_task, data_dir, **sections)

    return make


@pytest.fixture
def on_cpu(monkeypatch):
    """Train on the CPU even where CUDA is present: for tests whose numbers were pinned on
    the CPU (dropout draws and kernels differ on a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def reset_accelerate() -> None:
    """Forget the settings of earlier `Accelerator`s (they live in process-wide singletons)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
