"""AdamW parameter groups (weight decay, layer-wise LR decay) and the LR schedule."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from trainer.config import TrainConfig

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


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Group trainable parameters by (decay?, LR scale); with `layerwise_lr_decay` = d, a
    parameter at depth k of L+1 gets lr x d^(L+1-k), so lower layers move less."""
    no_decay = _no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    indices = [int(m.group(1)) for n, _ in named if (m := _LAYER_INDEX.search(n))]
    num_layers = max(indices) + 1 if indices else 0
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in named:
        decay = name not in no_decay
        depth = _depth(name, num_layers) if cfg.layerwise_lr_decay < 1 else num_layers + 1
        scale = cfg.layerwise_lr_decay ** (num_layers + 1 - depth)
        group = groups.setdefault(
            (decay, depth),
            {
                "params": [],
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr": cfg.lr * scale,
            },
        )
        group["params"].append(param)
    return list(groups.values())


FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW runs


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the parameter groups, with torch's fused kernel (one pass over each
    parameter's state; on a 2-core CPU the MiniLM update took 0.035 s instead of 0.14 s
    with foreach) when every trainable parameter is a floating-point tensor on a device that
    kernel supports, foreach kernels otherwise."""
    groups = parameter_groups(model, cfg)
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup over `warmup_ratio` of the steps, then linear/cosine decay or constant."""
    warmup = round(cfg.warmup_ratio * total_steps)
    factor = lr_factor(cfg.scheduler, warmup, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
