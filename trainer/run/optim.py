"""AdamW parameter groups (weight decay, layer-wise LR decay, a new head's own LR) and the
LR schedule, with the head warm-up: parameters the checkpoint lacked learn alone first."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.config import TrainConfig
from trainer.model.adapters import NEW_PARAMETERS

# Where a transformer block's index appears in parameter names: BERT `layer.3.`,
# Llama `layers.3.`, GPT-2 `h.3.`, T5 `block.3.`.
_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")
_EMBEDDING = re.compile(r"embed|\.wte\.|\.wpe\.")


def _no_decay_names(model: torch.nn.Module) -> set[str]:
    """Biases and normalisation weights: decaying them hurts and regularises nothing."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias":
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def _depth(name: str, num_layers: int) -> int:
    """0 for embeddings, 1..L for the blocks, L+1 for everything above them (the head)."""
    match = _LAYER_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    return 0 if _EMBEDDING.search(name) else num_layers + 1


def _loaded_name(name: str) -> str:
    """A parameter's name as the loaded model had it, before peft wrapped it
    (`base_model.model.` in front, a head's trained copy in `modules_to_save.default`)."""
    return name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")


def new_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters the checkpoint lacked (trainer/model/load.py
    records them at load): a sentence-embedding BERT's MLM head, a classifier. Adapter
    weights (LoRA) are not among them: they start as a no-op, not as noise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    recorded = set(getattr(base, NEW_PARAMETERS, ()))
    return [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and _loaded_name(name) in recorded
    ]


@dataclass(frozen=True)
class HeadWarmup:
    """The parameters the checkpoint lacked, and the first steps in which they learn alone
    while every other parameter has LR 0: the first gradients of a random head are noise,
    and run through the pretrained encoder otherwise (issue 18, DAPT from MiniLM)."""

    names: tuple[str, ...]
    count: int  # scalar parameters in them
    steps: int
    lr: float  # their peak LR

    def summary(self) -> dict:
        """What run_summary.json says of them."""
        return {
            "new_parameters": list(self.names),
            "new_parameter_count": self.count,
            "head_warmup_steps": self.steps,
            "head_lr": self.lr,
        }

    def line(self) -> str | None:
        """The log line announcing the warm-up (None: there is none)."""
        if not self.steps:
            return None
        return (
            f"head warm-up: {self.count:,} new parameters learn alone for the first "
            f"{self.steps} steps"
        )


def head_warmup(
    model: torch.nn.Module, cfg: TrainConfig, task_default: float, total_steps: int
) -> HeadWarmup:
    """The run's head warm-up: `train.head_warmup_ratio` of the steps (unset: the task's
    default), none when no trainable parameter is new."""
    names = new_parameters(model)
    parameters = dict(model.named_parameters())
    ratio = task_default if cfg.head_warmup_ratio is None else cfg.head_warmup_ratio
    steps = round(ratio * total_steps) if names else 0
    count = sum(parameters[name].numel() for name in names)
    return HeadWarmup(tuple(names), count, steps, cfg.head_lr or cfg.lr)


def parameter_groups(
    model: torch.nn.Module, cfg: TrainConfig, new: frozenset[str] = frozenset()
) -> list[dict]:
    """Group trainable parameters by (decay?, LR scale, new?); with `layerwise_lr_decay` = d,
    a parameter at depth k of L+1 gets lr x d^(L+1-k), so lower layers move less. The `new`
    ones (the head the checkpoint lacked) get `head_lr` and a group flagged `head`, which
    the schedule lets learn during the head warm-up."""
    no_decay = _no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    indices = [int(m.group(1)) for n, _ in named if (m := _LAYER_INDEX.search(n))]
    num_layers = max(indices) + 1 if indices else 0
    groups: dict[tuple[bool, int, bool], dict] = {}
    for name, param in named:
        decay, head = name not in no_decay, name in new
        depth = _depth(name, num_layers) if cfg.layerwise_lr_decay < 1 else num_layers + 1
        scale = cfg.layerwise_lr_decay ** (num_layers + 1 - depth)
        group = groups.setdefault(
            (decay, depth, head),
            {
                "params": [],
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr": (cfg.head_lr or cfg.lr) if head else cfg.lr * scale,
                "head": head,
            },
        )
        group["params"].append(param)
    return list(groups.values())


FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW runs


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, new: frozenset[str] = frozenset()
) -> torch.optim.Optimizer:
    """AdamW over the parameter groups, with torch's fused kernel (one pass over each
    parameter's state; on a 2-core CPU the MiniLM update took 0.035 s instead of 0.14 s
    with foreach) when every trainable parameter is a floating-point tensor on a device that
    kernel supports, foreach kernels otherwise."""
    groups = parameter_groups(model, cfg, new)
    params = [p for group in groups for p in group["params"]]
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None, foreach=not fused or None)


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The LR multiplier at each step: linear warmup from 0 over `warmup` steps, then linear
    decay to 0, half a cosine to 0, or constant. The formulas of transformers' schedules
    (`get_linear_schedule_with_warmup` & co.), written here because importing those pulls in
    transformers.trainer_utils, which imports peft: ~5 s at every start."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return factor


def delayed(factor: Callable[[int], float], start: int) -> Callable[[int], float]:
    """`factor` shifted to begin at step `start`, 0 before it."""
    return lambda step: 0.0 if step < start else factor(step - start)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, head_steps: int = 0
):
    """Linear warmup over `warmup_ratio` of the steps, then linear/cosine decay or constant;
    per group. With a head warm-up of `head_steps`, the groups not flagged `head` have LR 0
    for those steps (AdamW's decoupled decay, lr x weight_decay, is 0 with it) and then the
    same warmup and decay over the steps left. A per-group LR, not requires_grad, keeps the
    optimizer, DDP and ZeRO unchanged and a resume inside the warm-up exact."""
    warmup = round(cfg.warmup_ratio * total_steps)
    whole = lr_factor(cfg.scheduler, warmup, total_steps)
    rest = total_steps - head_steps
    late = delayed(lr_factor(cfg.scheduler, round(cfg.warmup_ratio * rest), rest), head_steps)
    factors = [whole if group.get("head") else late for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
