"""`trainer export`: an adapter run as a clean adapter folder, or merged into a standalone model.

Merging checks itself: the merged model's logits on sample inputs must match those of the
base + adapter it came from, or nothing is written. For QLoRA the adapter is merged into
the *dequantized* 4-bit base (in the compute dtype), which is the model that was trained,
rather than into the original full-precision weights, which it never saw.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trainer.config import RunConfig, dump_yaml
from trainer.errors import UserError
from trainer.model import adapters, dtypes, labelled_base
from trainer.model.load import load_model, load_tokenizer
from trainer.model.saved import RUN_CONFIG_NAME, SavedModel
from trainer.run.resume import CHECKPOINTS, checkpoint_dir
from trainer.security import umask_modes
from trainer.tasks.registry import task_spec
from trainer.tasks.spec import TaskSpec

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


def _saved_adapter(run_or_model_dir: str, checkpoint: str | None = None) -> SavedModel:
    folder = _source_folder(run_or_model_dir, checkpoint)
    saved = SavedModel.read(folder, "RUN_DIR")
    if not saved.is_adapter:
        raise UserError(f"RUN_DIR: {run_or_model_dir} holds no LoRA/QLoRA adapter to export")
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


def export(run_or_model_dir: str, out: str, merge: bool, checkpoint: str | None = None) -> dict:
    """Write the adapter (clean copy) or the merged model to `out`; returns a summary."""
    saved = _saved_adapter(run_or_model_dir, checkpoint)
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"--out: {out} exists and is not empty")
    cfg = saved.run_config()
    spec = task_spec(cfg)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = load_tokenizer(cfg.model, spec)
    summary = {"source": str(saved.folder), "out": str(target), "merged": merge}
    if merge:
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
        merged.save_pretrained(tmp, safe_serialization=True)
        cfg.peft.method = "none"
        summary["max_logit_difference"] = difference
    else:
        for name in (*ADAPTER_FILES, OLD_CONFIG):
            if (saved.folder / name).is_file():
                shutil.copy2(saved.folder / name, tmp / name)
        labelled_base.copy_to(saved.folder, tmp, target)
    tokenizer.save_pretrained(tmp)
    cfg.model.name_or_path = str(target.resolve())
    (tmp / RUN_CONFIG_NAME).write_text(dump_yaml(cfg))
    umask_modes(tmp)
    if target.exists():
        target.rmdir()
    tmp.rename(target)
    summary["task"] = cfg.task
    return summary
