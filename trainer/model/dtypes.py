"""The dtypes a run's weights are kept in (`model.dtype`): one rule for training, evaluation,
prediction and `trainer plan`.

transformers 5 loads a checkpoint in its own dtype (`dtype="auto"`), so a model shipped in
bf16 (Llama, Qwen, Mistral) would train in bf16: no fp32 master copy, even under
`train.precision=no`, where a bf16 and an fp32 copy of the same weights then train apart.
So the dtype is always chosen here:

- trained weights are fp32 unless `model.dtype` asks for 16 bits (full fine-tuning only;
  LoRA adapters and the heads trained in full next to them are always fp32);
- a frozen LoRA / QLoRA base is kept in the dtype its matrix products run in anyway,
  train.precision's (autocast casts fp32 weights to it op by op), which halves its memory
  under bf16 and keeps it fp32 under precision `no`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
COMPUTE = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # train.precision -> its dtype
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def base_dtype(model_dtype: str | None, peft_method: str, precision: str) -> str:
    """The dtype the model is loaded in: fp32 | bf16 | fp16 | auto (the checkpoint's)."""
    if model_dtype is not None:
        return model_dtype
    return "fp32" if peft_method == "none" else COMPUTE[precision]


def trained_dtype(model_dtype: str | None, peft_method: str, precision: str) -> str:
    """The dtype of the trained parameters: the loaded one for full fine-tuning, else fp32."""
    return base_dtype(model_dtype, peft_method, precision) if peft_method == "none" else "fp32"


def to_torch(name: str) -> torch.dtype | str:
    """A dtype name as `from_pretrained` takes it ('auto' stays a string)."""
    import torch

    return "auto" if name == "auto" else getattr(torch, TORCH_NAMES[name])


def from_torch(dtype: torch.dtype | str | None) -> str:
    """A checkpoint's dtype (a config's `dtype`) as a name here; unknown or unset: fp32,
    which is what transformers assumes for a config that names none."""
    name = str(dtype or "float32").removeprefix("torch.")
    return {torch_name: short for short, torch_name in TORCH_NAMES.items()}.get(name, "fp32")


def keep_trained_in_fp32(model: torch.nn.Module) -> None:
    """Under LoRA the heads trained in full (`modules_to_save`) are copies of base modules,
    in the base's 16-bit dtype: make every trainable parameter fp32, as peft makes the
    adapters (`autocast_adapter_dtype`), so that none trains without a master copy."""
    import torch

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
