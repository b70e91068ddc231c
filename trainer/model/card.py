"""The model card (README.md) of a saved model: what the Hub, its search and its widget read,
and what a person opening the folder reads first.

The YAML metadata is huggingface_hub's `ModelCardData` (base_model, library_name,
pipeline_tag, tags, datasets, license, and the final evaluation as `model-index`), so that it
parses as the Hub parses it; the body says what was trained on what, the metrics, the run
config and how to load the model. Everything comes from the files a run already keeps
(config.yaml, eval_results.json, run_summary.json), so that the finish, a restart that
completes an interrupted finish and `trainer export` write the same card for the same model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import (
    EvalResult,
    ModelCard,
    ModelCardData,
    metadata_load,
    try_to_load_from_cache as cached_hub_file,
)
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from trainer import atomic
from trainer.data.read import looks_like_file
from trainer.tasks.mlm import pretraining
from trainer.tasks.registry import TASKS
from trainer.tasks.spec import TaskSpec

CARD_NAME = "README.md"
# eval_results.json keys that say where the result came from rather than how good it is
BOOKKEEPING = frozenset({"best_step", "metric", "steps", "skipped_steps"})


@dataclass(frozen=True)
class CardFacts:
    """What a card says, gathered once."""

    config: dict  # the resolved run config the model was trained with (secrets redacted)
    results: dict | None  # the run's eval_results.json; None: not a finished run's model
    summary: dict | None  # the run's run_summary.json (row counts, labels); None: unknown
    library: str  # "transformers" (a full model) or "peft" (an adapter)

    @property
    def labels(self) -> list[str] | None:
        return (self.summary or {}).get("labels")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def library_of(config: dict) -> str:
    """The library a model trained with `config` loads with: peft for an adapter."""
    return "transformers" if config.get("peft", {}).get("method", "none") == "none" else "peft"


def run_facts(run_dir: Path) -> CardFacts:
    """The facts of a finished run (or one finishing: eval_results.json is written), from
    its files."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    results, summary = _json(run_dir / "eval_results.json"), _json(run_dir / "run_summary.json")
    return CardFacts(config, results, summary, library_of(config))


def is_hub_id(name: str | None) -> bool:
    """A model or dataset id on the Hub, rather than a local path (the Hub rejects a card
    whose base_model or datasets are not ids)."""
    if not name or looks_like_file(name) or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _spec(config: dict) -> TaskSpec:
    """The task's spec; BERT pretraining (mlm.next_sentence) loads with its own Auto class."""
    if config.get("mlm", {}).get("next_sentence"):
        return pretraining(config.get("train", {}).get("seed", 0))
    return TASKS[config["task"]]


def _base(config: dict) -> str | None:
    """The model it started from; None when trained from scratch (random weights)."""
    model = config.get("model", {})
    return None if model.get("from_scratch") else model.get("name_or_path") or None


def _license(config: dict) -> str | None:
    """The base model's license, as its own card states it: a local base's README.md, or a
    hub base's README.md when the hub cache holds it (never a network request here)."""
    base = _base(config)
    if base is None:
        return None
    if is_hub_id(base):
        revision = config.get("model", {}).get("revision")
        found = cached_hub_file(base, CARD_NAME, revision=revision)
        readme = Path(found) if isinstance(found, str) else None
    else:
        readme = Path(base).expanduser() / CARD_NAME
    if readme is None or not readme.is_file():
        return None
    try:
        return (metadata_load(readme) or {}).get("license")
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _sources(config: dict, summary: dict | None) -> list[tuple[str, str, int | None]]:
    """(path or hub id, role, rows) of the training and validation data."""
    data = config.get("data", {})
    if summary and summary.get("train_sources"):
        train = [(s["path"], "train", s.get("examples")) for s in summary["train_sources"]]
    else:
        entries = data.get("train") if isinstance(data.get("train"), list) else [data.get("train")]
        paths = [entry["path"] if isinstance(entry, dict) else entry for entry in entries]
        train = [(path, "train", None) for path in paths if path]
    validation = []
    if data.get("validation"):
        rows = (summary or {}).get("validation_examples")
        validation = [(data["validation"], "validation", rows)]
    elif data.get("validation_split"):
        share = f"validation ({data['validation_split']:.0%} of train held out)"
        validation = [("(held out from train)", share, (summary or {}).get("validation_examples"))]
    return train + validation


def _hub_datasets(config: dict) -> list[str]:
    """The hub dataset ids among the data sources (`NAME:SPLIT` names NAME)."""
    names = [path.partition(":")[0] for path, _, _ in _sources(config, None)]
    return list(dict.fromkeys(name for name in names if is_hub_id(name)))


def metrics_of(results: dict | None) -> dict[str, float]:
    """The scores in eval_results.json (its bookkeeping and non-finite values left out)."""
    return {
        key: value
        for key, value in (results or {}).items()
        if key not in BOOKKEEPING
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }


def _eval_results(facts: CardFacts, spec: TaskSpec) -> list[EvalResult]:
    """The final metrics as the Hub's model-index, on the data they were measured on."""
    data = facts.config.get("data", {})
    if data.get("validation"):
        source, split = data["validation"], "validation"
    else:
        train = _sources(facts.config, None)
        source = train[0][0] if train else "train"
        split = "validation" if data.get("validation_split") else "train"
    name, _, hub_split = source.partition(":")
    dataset = name if is_hub_id(name) else Path(name).name
    return [
        EvalResult(
            task_type=spec.pipeline_tag,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_config=data.get("hub_config") if is_hub_id(name) else None,
            dataset_split=hub_split or split,
            metric_type=metric,
            metric_value=value,
        )
        for metric, value in metrics_of(facts.results).items()
    ]


def model_card(facts: CardFacts, model_ref: str, name: str) -> ModelCard:
    """The card of a model that loads from `model_ref` (a folder or a hub repo id), called
    `name` in its model-index."""
    spec, base = _spec(facts.config), _base(facts.config)
    method = facts.config.get("peft", {}).get("method", "none")
    results = _eval_results(facts, spec)
    data = ModelCardData(
        model_name=name,
        base_model=base if is_hub_id(base) else None,
        library_name=facts.library,
        pipeline_tag=spec.pipeline_tag,
        tags=["steadytrain", facts.config["task"], *([method] if method != "none" else [])],
        datasets=_hub_datasets(facts.config) or None,
        license=_license(facts.config),
        eval_results=results or None,
    )
    sections = [
        f"# {name}",
        _about(facts, spec, base, method),
        _data_section(facts),
        _metrics_section(facts),
        _usage_section(facts, spec, base, model_ref),
        "## Training config\n\nThe resolved run config (`trainer train` with it trains this "
        f"model again):\n\n```yaml\n{yaml.safe_dump(facts.config, sort_keys=False)}```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _about(facts: CardFacts, spec: TaskSpec, base: str | None, method: str) -> str:
    started = f"fine-tuned from `{base}`" if base else "trained from scratch (random weights)"
    how = "a LoRA adapter" if method == "lora" else "a QLoRA adapter (4-bit base)"
    kind = how if facts.library == "peft" else "a full model"
    merged = ", merged into its base" if method != "none" and facts.library != "peft" else ""
    labels = f" Labels: {', '.join(facts.labels)}." if facts.labels else ""
    return (
        f"A `{facts.config['task']}` model ({spec.pipeline_tag}), {started}: {kind}{merged}, "
        f"trained with steadytrain.{labels}"
    )


def _data_section(facts: CardFacts) -> str:
    rows = [
        f"| `{path}` | {role} | {'?' if count is None else count} |"
        for path, role, count in _sources(facts.config, facts.summary)
    ]
    return "## Data\n\n| source | split | rows |\n|---|---|---|\n" + "\n".join(rows)


def _metrics_section(facts: CardFacts) -> str:
    metrics = metrics_of(facts.results)
    if not metrics:
        return "## Results\n\nNo final evaluation (not a finished run's model)."
    results = facts.results or {}
    rows = "\n".join(f"| {metric} | {value:.6g} |" for metric, value in metrics.items())
    where = f"after {results.get('steps')} optimizer steps"
    if isinstance(results.get("best_step"), int):
        steps = f"step {results['best_step']} of {results.get('steps')}"
        where = f"the best by `{results['metric']}`: {steps}"
    return f"## Results\n\nThe final model ({where}):\n\n| metric | value |\n|---|---|\n{rows}"


def _usage_section(facts: CardFacts, spec: TaskSpec, base: str | None, model_ref: str) -> str:
    if facts.library != "peft":
        code = (
            "from transformers import pipeline\n\n"
            f'model = pipeline("{spec.pipeline_tag}", model="{model_ref}")'
        )
        return f"## How to load\n\n```python\n{code}\n```"
    labels = ""
    if facts.labels:
        id2label = dict(enumerate(facts.labels))
        label2id = {label: number for number, label in id2label.items()}
        labels = f", id2label={id2label}, label2id={label2id}"
    code = (
        "from peft import PeftModel\n"
        f"from transformers import AutoTokenizer, {spec.auto_class}\n\n"
        f'base = {spec.auto_class}.from_pretrained("{base}"{labels})\n'
        f'model = PeftModel.from_pretrained(base, "{model_ref}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{model_ref}")'
    )
    merge = "`trainer export RUN --merge --out DIR` writes it merged into a standalone model."
    return f"## How to load\n\nThe adapter on its base:\n\n```python\n{code}\n```\n\n{merge}"


def write_card(folder: Path, card: ModelCard) -> None:
    """`folder/README.md`, atomically (replacing the template peft's save_pretrained writes)."""
    atomic.write_text(folder / CARD_NAME, str(card))


def finished_run_card(run_dir: Path) -> ModelCard:
    """The card of a run's final/, once its eval_results.json is written."""
    facts = run_facts(run_dir)
    return model_card(facts, str((run_dir / "final").resolve()), run_dir.resolve().name)
