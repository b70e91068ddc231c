"""`trainer export`: an adapter run as a clean adapter folder, or merged into a standalone
model; a full model as a copy of its folder. Each with its model card (trainer/model/card.py),
saying peft for an adapter and transformers for the others; `--push-to-hub` writes the
folder as the hub will hold it (trainer/commands/push.py).

Merging checks itself: the merged model's logits on sample inputs must match those of the
base + adapter it came from, or nothing is written. For QLoRA the adapter is merged into
the *dequantized* 4-bit base (in the compute dtype), which is the model that was trained,
rather than into the original full-precision weights, which it never saw.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import atomic
from trainer.config import RunConfig, dump_yaml, to_dict
from trainer.errors import UserError
from trainer.logs import get_logger
from trainer.model import adapters, carried, dtypes, labelled_base
from trainer.model.card import (
    CARD_NAME,
    CardFacts,
    is_hub_id,
    library_of,
    model_card,
    run_facts,
    write_card,
)
from trainer.model.load import load_model, load_tokenizer
from trainer.model.saved import RUN_CONFIG_NAME, SavedModel
from trainer.run.resume import CHECKPOINTS, checkpoint_dir
from trainer.security import umask_modes
from trainer.tasks.registry import task_spec
from trainer.tasks.spec import TaskSpec

logger = get_logger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OLD_CONFIG = "config.json"  # next to adapters saved before base/ (labelled_base.py)
SAMPLE_TEXTS = (
    "The results were better than anyone expected.",
    "She moved to Berlin in 2019 to work for a small startup.",
    "Patients received 50 mg daily for two weeks.",
    "Honestly, the second half of the film drags.",
)
TOLERANCE = {"no": 1e-4, "bf16": 5e-2, "fp16": 1e-2}


def _source_folder(run_or_model_dir: str, checkpoint: str | None) -> Path:
    """The folder to export: the run's final/, or with `checkpoint` (step-N or N) the model
    of that checkpoint, which a running or stopped run already has."""
    folder = Path(run_or_model_dir)
    if checkpoint is None:
        return folder / "final" if (folder / "final").is_dir() else folder
    step = checkpoint.removeprefix("step-")
    found = checkpoint_dir(folder, int(step)) if step.isdigit() else None
    if found is None or not found.is_dir():
        raise UserError(f"--checkpoint: no checkpoint {checkpoint} in {folder / CHECKPOINTS}")
    return found  # SavedModel.read opens its model/, or says why it has none


def _saved_model(run_or_model_dir: str, checkpoint: str | None, merge: bool) -> SavedModel:
    folder = _source_folder(run_or_model_dir, checkpoint)
    saved = SavedModel.read(folder, "RUN_DIR")
    if merge and not saved.is_adapter:
        raise UserError(
            f"--merge: {run_or_model_dir} holds no LoRA/QLoRA adapter to merge (a full model "
            "exports as it is, without --merge)"
        )
    return saved


def _sample_batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = [text.replace("better", tokenizer.mask_token or "better") for text in SAMPLE_TEXTS]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def max_logit_difference(first: torch.nn.Module, second: torch.nn.Module, batch: dict) -> float:
    """Largest absolute logit difference on the batch's real (non-padding) positions."""
    first.eval()
    second.eval()
    a, b = first(**batch).logits.float(), second(**batch).logits.float()
    if a.dim() == 3:  # per-token logits: ignore padding positions
        keep = batch["attention_mask"].bool()
        a, b = a[keep], b[keep]
    return (a - b).abs().max().item()


def _merged(saved: SavedModel, cfg: RunConfig, spec: TaskSpec, tokenizer) -> torch.nn.Module:
    """Base (dequantized for QLoRA) + adapter, merged into plain layers."""
    base_cfg = type(cfg.model)(name_or_path=saved.base, revision=saved.base_revision)
    qlora = cfg.peft.method == "qlora"
    quantization = adapters.quantization_config(cfg.train.precision) if qlora else None
    # the dtype of the adapted model it is checked against (trainer/model/dtypes.py)
    dtype = dtypes.base_dtype(cfg.model.dtype, cfg.peft.method, cfg.train.precision)
    base = load_model(
        base_cfg, spec, tokenizer, saved.label_names, cfg.train.seed, quantization, dtype=dtype
    )
    if qlora:
        base = base.dequantize()
    return adapters.load_adapter(base, saved.folder).merge_and_unload()


@dataclass(frozen=True)
class Destination:
    """Where an export goes: `folder` (it must not exist, or be empty), loaded from `ref`
    (the folder, or the hub repo id it is pushed to) and called `name` in its card. A hub
    destination holds no base/ (its weight index names local files): the adapter names
    the base it was trained on, and the card says how to load it with the run's labels."""

    folder: Path
    ref: str
    name: str
    for_hub: bool = False

    @classmethod
    def local(cls, out: str) -> Destination:
        return cls(Path(out), str(Path(out).resolve()), Path(out).resolve().name)

    @classmethod
    def hub(cls, folder: Path, repo_id: str) -> Destination:
        return cls(folder, repo_id, repo_id.rpartition("/")[2], for_hub=True)


def export(
    run_or_model_dir: str, to: Destination, merge: bool, checkpoint: str | None = None
) -> dict:
    """Write the adapter (clean copy), the merged model or a full model's copy, with its
    model card, to `to.folder`; returns a summary."""
    saved = _saved_model(run_or_model_dir, checkpoint, merge)
    target = to.folder
    if target.exists() and any(target.iterdir()):
        raise UserError(f"--out: {target} exists and is not empty")
    cfg = saved.run_config()
    facts = _card_facts(saved, cfg, merge)
    spec = task_spec(cfg)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = load_tokenizer(cfg.model, spec)
    summary = {"source": str(saved.folder), "out": str(target), "merged": merge}
    if merge:
        summary["max_logit_difference"] = _write_merged(saved, cfg, spec, tokenizer, tmp)
        cfg.peft.method = "none"
    elif saved.is_adapter:
        _copy_adapter(saved, tmp, to)
    else:
        shutil.copytree(saved.folder, tmp, dirs_exist_ok=True, ignore=_not_exported)
    tokenizer.save_pretrained(tmp)
    cfg.model.name_or_path = to.ref
    (tmp / RUN_CONFIG_NAME).write_text(dump_yaml(cfg))
    write_card(tmp, model_card(facts, to.ref, to.name))
    umask_modes(tmp)
    if target.exists():
        target.rmdir()
    tmp.rename(target)
    summary["task"] = cfg.task
    return summary


def _not_exported(folder: str, names: list[str]) -> list[str]:
    """What a full model's copy leaves out: its card (written anew) and its run config
    (pointed at the copy)."""
    return [name for name in names if name in (CARD_NAME, RUN_CONFIG_NAME)]


def _card_facts(saved: SavedModel, cfg: RunConfig, merge: bool) -> CardFacts:
    """The exported model's card facts: the config it was trained with, and, for a run's
    final/, the run's results and data counts."""
    config = copy.deepcopy(saved.trained_with) or to_dict(cfg)
    if saved.is_adapter:
        config.setdefault("model", {})["name_or_path"] = saved.base
    run_dir = saved.folder.parent if saved.folder.name == "final" else None
    facts = run_facts(run_dir) if run_dir and (run_dir / "config.yaml").is_file() else None
    library = "transformers" if merge else library_of(config)
    return CardFacts(
        config,
        facts.results if facts else None,
        facts.summary if facts else {"labels": saved.label_names},
        library,
    )


def _write_merged(saved: SavedModel, cfg: RunConfig, spec: TaskSpec, tokenizer, tmp: Path) -> float:
    """The merged model in `tmp`, once its logits match the adapted model's; the largest
    difference."""
    adapted = saved.load(
        spec,
        tokenizer,
        cfg.peft,
        cfg.train.precision,
        cfg.train.seed,
        model_dtype=cfg.model.dtype,
    )
    merged = _merged(saved, cfg, spec, tokenizer)
    difference = max_logit_difference(adapted, merged, _sample_batch(tokenizer))
    tolerance = TOLERANCE[cfg.train.precision]
    if not difference <= tolerance:
        shutil.rmtree(tmp)
        raise UserError(
            f"merge check failed: max |logit difference| {difference:.3g} > {tolerance:g}"
        )
    extra = carried.tensors(merged)  # a pooler the base model's task class has no place for
    state_dict = {**extra, **merged.state_dict()} if extra else None
    merged.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    return difference


def _copy_adapter(saved: SavedModel, tmp: Path, to: Destination) -> None:
    """The adapter's files, with its base/ (locally) or naming its original base (hub)."""
    for name in (*ADAPTER_FILES, OLD_CONFIG):
        if (saved.folder / name).is_file():
            shutil.copy2(saved.folder / name, tmp / name)
    if not to.for_hub:
        labelled_base.copy_to(saved.folder, tmp, to.folder)
        return
    adapter = json.loads((tmp / ADAPTER_FILES[0]).read_text())
    adapter["base_model_name_or_path"] = saved.base
    atomic.write_json(tmp / ADAPTER_FILES[0], adapter, indent=2)
    if not is_hub_id(saved.base):
        logger.warning(
            "the adapter's base %s is a local folder: the pushed adapter loads only where "
            "that folder is",
            saved.base,
        )
