"""Saving: the model in Hugging Face format (best/, final/) and the full training state.

Folders are written under a temporary name and renamed into place, so a crash during a
save never leaves a half-written `best/` or `final/` behind, and the previous one stays.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from accelerate import Accelerator
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from trainer.config import RunConfig, dump_yaml

RUN_CONFIG_NAME = "trainer_config.yaml"  # inside a saved model: how it was trained


def _replace(tmp: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_model(
    accelerator: Accelerator,
    model,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    cfg: RunConfig,
) -> None:
    """Save weights (safetensors), tokenizer and run config so that
    `AutoModelFor*.from_pretrained(target)` and `pipeline(...)` load it on one device.
    `get_state_dict` gathers the full weights when they are sharded (ZeRO-3, FSDP)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if isinstance(unwrapped, PeftModel):
            _save_base_config(unwrapped.get_base_model(), tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RUN_CONFIG_NAME).write_text(dump_yaml(cfg))
        _replace(tmp, target)
    accelerator.wait_for_everyone()


def _save_base_config(base, folder: Path) -> None:
    """Next to an adapter: the base's config with the label names and the head class, so
    that the task and labels of the folder are known without loading the base."""
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the base is quantized again when loaded
    config.save_pretrained(folder)


def copy_model(source: Path, target: Path) -> None:
    """Copy a saved model folder (best/ to final/) with the same all-or-nothing rename."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    _replace(tmp, target)


def save_training_state(accelerator: Accelerator, target: Path, counters: dict) -> None:
    """Model, optimizer, scheduler and RNG states via Accelerate, plus the step counters."""
    accelerator.save_state(str(target), safe_serialization=True)
    if accelerator.is_main_process:
        (target / "trainer_state.json").write_text(json.dumps(counters, indent=2))
    accelerator.wait_for_everyone()
