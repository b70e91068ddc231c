"""Run-config checks that look outside the config: the filesystem, the installed packages,
the libraries' seed range, the dtypes a LoRA step can mix.

Each of these failed at set-up or at step 1 with a traceback (a FileExistsError from
mkdir, an ImportError from transformers, numpy's "Seed must be between 0 and 2**32 - 1",
a dtype mismatch in the first forward pass); found here, they join the config's other
problems in one line, before torch is imported. Only cheap checks: `find_spec` does not
import the package, and a path is looked at, never created.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.model.dtypes import COMPUTE
from trainer.trackers import TRACKERS, missing_line

if TYPE_CHECKING:
    from trainer.config import RunConfig

SEED_LIMIT = 2**32  # numpy's np.random.seed (Accelerate's set_seed seeds it) takes [0, 2**32)

# what a key's value needs: (key, value) -> (import names, any one will do; what to install)
PACKAGES = {
    ("model.attn_implementation", "flash_attention_2"): (("flash_attn",), "flash-attn"),
    ("model.attn_implementation", "flash_attention_3"): (("flash_attn_interface",), "flash-attn-3"),
    ("peft.method", "lora"): (("peft",), "peft"),
    ("peft.method", "qlora"): (("bitsandbytes",), "bitsandbytes"),
}


def check_inputs(cfg: RunConfig, for_training: bool, errors: list[str]) -> None:
    """Append a line per problem to `errors` (the training-only ones only for training:
    evaluate and predict read a saved run's config, whose tracker they do not start)."""
    _check_packages(cfg, for_training, errors)
    if not for_training:
        return
    _check_lora_dtype(cfg, errors)
    if not 0 <= cfg.train.seed < SEED_LIMIT:
        errors.append(
            f"train.seed: must be in [0, 2**32 - 1] (numpy's seed range), got {cfg.train.seed}"
        )
    _check_writable_folder("output_dir", cfg.output_dir, errors)
    if cfg.data.cache_dir is not None:
        _check_writable_folder("data.cache_dir", cfg.data.cache_dir, errors)


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing; a module set to None
        return False


def _check_packages(cfg: RunConfig, for_training: bool, errors: list[str]) -> None:
    """Values whose package is not installed: named with what to install, not left to an
    ImportError at model loading (or a missing tracker at the first log line). Loading a
    saved model needs only the PEFT ones."""
    wanted = [
        ("peft.method", cfg.peft.method),
        ("peft.method", "lora" if cfg.peft.method == "qlora" else None),  # QLoRA is LoRA too
    ]
    if for_training:
        wanted.append(("model.attn_implementation", cfg.model.attn_implementation))
        for tracker in cfg.log.trackers:  # the names are checked in config.py
            if tracker in TRACKERS and not any(map(installed, TRACKERS[tracker][0])):
                errors.append(missing_line(tracker))
    for key, value in wanted:
        modules, package = PACKAGES.get((key, value), ((), None))
        if modules and not any(installed(module) for module in modules):
            errors.append(
                f"{key}: {value} needs the {package} package, which is not installed "
                f"(pip install {package})"
            )


def _check_lora_dtype(cfg: RunConfig, errors: list[str]) -> None:
    """A 16-bit LoRA base computes in its own dtype while the adapters and heads are fp32
    (model/dtypes.py): only autocast in that same dtype lets the two meet in one matrix
    product; without it the first forward pass fails on mixed dtypes."""
    dtype = cfg.model.dtype
    if cfg.peft.method != "lora" or dtype not in ("bf16", "fp16"):
        return
    if COMPUTE.get(cfg.train.precision) != dtype:
        errors.append(
            f"model.dtype: a {dtype} LoRA base needs train.precision={dtype} (the fp32 "
            f"adapters meet its {dtype} outputs under autocast); leave model.dtype unset"
        )


def _check_writable_folder(key: str, folder: str, errors: list[str]) -> None:
    """A folder the run creates (or writes into): refused when it, or the nearest folder
    above it that exists, is a file, or when that folder cannot be written to."""
    path = Path(folder).expanduser().absolute()
    if path.exists() and not path.is_dir():
        errors.append(f"{key}: {folder} is a file, not a directory")
        return
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        errors.append(f"{key}: can't create {folder}: {existing} is a file, not a directory")
    elif not os.access(existing, os.W_OK | os.X_OK):
        errors.append(f"{key}: can't write to {existing} (permission denied)")
