"""Dynamic int8 quantization of a model's Linear layers, for CPU inference
(`trainer predict --quantize int8`): weights stored in int8, activations quantized per
batch, matmuls in int8; never the default, since it changes some predictions.

Why `torch.ao.quantization.quantize_dynamic` and not torchao, which replaces it: torchao
0.18's `quantize_(model, Int8DynamicActivationInt8WeightConfig())` runs on torch 2.13 CPU,
but its int8 tensors have no fast eager CPU kernel: on all-MiniLM-L6-v2 (2 cores, batch 32)
it measured 3 to 5x slower than float32, and only as fast as float32 after a 37 s
`torch.compile` (which `trainer predict` would pay on every run and every new batch
shape). `quantize_dynamic` calls fbgemm's int8 kernels and was 1.2 to 1.4x faster than
float32 on the same batch; torch 2.13 still ships it, deprecated (its warnings are
silenced here), so a torch without it is one error line.
"""

from __future__ import annotations

import warnings

import torch

from trainer.errors import UserError
from trainer.model import adapters


def quantize_linear_layers(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its `torch.nn.Linear` layers made dynamic int8 (in place). A PEFT model
    has its adapter in use merged into the base first: LoRA layers that stay apart would
    run next to int8 base layers that they were not trained against, and the merged model
    is one matmul per layer instead of three."""
    quantize = getattr(torch.ao.quantization, "quantize_dynamic", None)
    if quantize is None:
        raise UserError(
            f"--quantize int8: torch {torch.__version__} no longer has "
            "torch.ao.quantization.quantize_dynamic"
        )
    if adapters.is_peft_model(model):
        model = model.merge_and_unload()
    if not any(isinstance(module, torch.nn.Linear) for module in model.modules()):
        kind = type(model).__name__
        raise UserError(f"--quantize int8: {kind} has no torch.nn.Linear layers to quantize")
    with warnings.catch_warnings():  # deprecated in favour of torchao: see the docstring
        warnings.simplefilter("ignore")
        return quantize(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
