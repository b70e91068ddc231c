"""Users' own launch files (an Accelerate config, a DeepSpeed JSON) against the run config.

Accelerate and DeepSpeed read the batch, accumulation, clipping and precision from such
files, and some of those silently win over what the run config derives (accelerate's
ACCELERATE_GRADIENT_ACCUMULATION_STEPS beats the Accelerator's own argument), so the loop's
accumulation window would disagree with `accelerator.accumulate()`. Each such setting must
therefore equal the run config's value, or be "auto" (Hugging Face's convention: filled in
from the run config here), or the file is refused with one line naming both values.
Torch-free: `trainer train` checks its environment with this before anything heavy loads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from trainer.config import RunConfig
from trainer.errors import UserError

AUTO = "auto"
# deepspeed_config keys of an Accelerate config that Accelerate refuses next to a JSON file
INLINE_DEEPSPEED = (
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "zero3_save_16bit_model",
)


def deepspeed_values(cfg: RunConfig, world_size: int, precision: str) -> dict[str, tuple]:
    """Dotted DeepSpeed key -> (the run config's value, the run config key it comes from)."""
    return {
        "train_batch_size": (cfg.train.global_batch_size, "train.global_batch_size"),
        "train_micro_batch_size_per_gpu": (cfg.train.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (
            cfg.gradient_accumulation_steps(world_size),
            f"train.global_batch_size / (train.micro_batch_size x {world_size} processes)",
        ),
        "gradient_clipping": (cfg.train.max_grad_norm, "train.max_grad_norm"),
        "bf16.enabled": (precision == "bf16", "train.precision"),
        "fp16.enabled": (precision == "fp16", "train.precision"),
    }


def same(have: object, want: object) -> bool:
    """Equal as DeepSpeed / Accelerate read them: "true" is True, "1" is 1.0."""
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        try:
            return float(have) == float(want)
        except (TypeError, ValueError):
            return False
    return str(have).lower() == str(want).lower()


def read_user_file(path: str | Path, option: str) -> dict:
    """A JSON or YAML mapping, or UserError naming the option and file."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as err:
        raise UserError(f"{option} {path}: {err.strerror}") from None
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"{option} {path}: not valid {path.suffix[1:] or 'YAML'}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{option} {path}: expected a mapping of settings")
    return data


def check_deepspeed(
    settings: dict, source: str, values: dict[str, tuple], zero_stage: int | None = None
) -> tuple[dict, list[str]]:
    """A copy of a DeepSpeed JSON with "auto" and missing values filled from the run
    config, and one error per setting that contradicts it (or per optimizer / scheduler
    block: the run config's train.* keys build those, the engine would build its own)."""
    errors = [
        f"{source}: remove its '{block}' block: the run config's train.* keys build the "
        f"{block}, and DeepSpeed would build its own from the block instead"
        for block in ("optimizer", "scheduler")
        if block in settings
    ]
    filled = copy.deepcopy(settings)
    if zero_stage is not None:
        values = {**values, "zero_optimization.stage": (zero_stage, "the profile's zero_stage")}
    for key, (want, origin) in values.items():
        *parents, leaf = key.split(".")
        node = filled
        for part in parents:
            node = node.setdefault(part, {})
        have = node.get(leaf, AUTO)
        if have == AUTO:
            node[leaf] = want
        elif not same(have, want):
            errors.append(f"{source}: {key} is {have} but the run config gives {want} ({origin})")
    return filled, errors


def merge_accelerate(ours: dict, theirs: dict, source: str, values: dict[str, tuple]) -> dict:
    """The user's Accelerate config laid over ours: their other settings kept, the run
    config's and the profile's values (`values`: dotted key -> (value, origin)) checked.
    The DeepSpeed JSON that ours points to holds precision, accumulation, clipping and the
    ZeRO stage, so their inline copies (which Accelerate refuses next to a JSON file) are
    checked and then dropped."""
    flat = _flatten(theirs)
    errors = [
        f"{source}: {key} is {flat[key]} but the run config gives {want} ({origin})"
        for key, (want, origin) in values.items()
        if flat.get(key, AUTO) != AUTO and not same(flat[key], want)
    ]
    if errors:
        raise UserError("; ".join(errors))
    merged = copy.deepcopy(ours)
    for key, value in theirs.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif key not in values:
            merged[key] = value
    if "deepspeed_config" in merged:
        merged.pop("mixed_precision", None)
        for key in INLINE_DEEPSPEED:
            merged["deepspeed_config"].pop(key, None)
        merged["deepspeed_config"]["deepspeed_config_file"] = ours["deepspeed_config"][
            "deepspeed_config_file"
        ]
    return merged


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
