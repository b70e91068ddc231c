"""LoRA and QLoRA through `peft` and `bitsandbytes`: what to quantize, what to adapt, how a
saved adapter finds its base again.

The task heads (classifier, LM head) stay out of quantization and are trained in full and
saved with the adapter (`modules_to_save`), so a 2 MB adapter folder is a complete model
once its base is loaded.

`peft` (with bitsandbytes) takes ~8 s to import, more than torch and transformers together,
so it is imported only by the functions that build or load an adapter: a full fine-tuning
run or a prediction with a full model starts that much sooner.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import BitsAndBytesConfig

from trainer.config import PeftConfig
from trainer.errors import UserError
from trainer.model.dtypes import COMPUTE, to_torch

if TYPE_CHECKING:
    from peft import PeftModel

    from trainer.tasks.spec import TaskSpec

# Never quantized: the task heads (each spec's modules_to_save), LM heads and BERT's pooler
# (it feeds the classifier, and a base saved without one gets it newly initialised, which
# 4-bit layers cannot be).
# Transformers matches these as prefixes/suffixes of module names (recent releases) or as
# substrings (older ones): ".*pooler" covers `bert.pooler.dense` under the first rule.
NOT_QUANTIZED = ["classifier", "score", "lm_head", "cls", "pooler", ".*pooler"]
COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantization_config(precision: str, sharded_storage: str | None = None) -> BitsAndBytesConfig:
    """4-bit NF4 with double quantization, computing in the run's precision.

    `sharded_storage`: the base's dtype name when FSDP or ZeRO-3 shard it. The packed 4-bit
    bytes are then stored as that float dtype (`bnb_4bit_quant_storage`), so that every
    parameter has the one float dtype those backends flatten and cast: a uint8 weight would
    be refused, or cast by value to bf16 by FSDP's mixed precision and by DeepSpeed's
    `module.bfloat16()`, which would destroy it. 'auto' stores in the compute dtype."""
    storage = {}
    if sharded_storage is not None:
        name = COMPUTE[precision] if sharded_storage == "auto" else sharded_storage
        storage["bnb_4bit_quant_storage"] = to_torch(name)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[precision],
        llm_int8_skip_modules=NOT_QUANTIZED,
        **storage,
    )


def keep_4bit_layout(model: torch.nn.Module) -> None:
    """Keep every 4-bit layer in the one layout QLoRA trains, evaluates, saves and merges.

    Why: bitsandbytes 0.49/0.50, on a CPU with AVX512-BF16 (Sapphire Rapids, Zen 4 and
    later), repacks a `Linear4bit` weight in place the first time the layer runs in eval mode
    on an input without gradients (`Linear4bit.forward` calls
    `bitsandbytes.functional._convert_weight_packed_for_cpu`), and leaves it repacked:
    - layers narrower than one quantization block (64 inputs) fail to repack (`shape '[32,
      0]' is invalid`);
    - the block scales (absmax) become bf16 and the product runs in bf16, so evaluation and
      prediction score a rounded model (logits off by ~5e-4 on all-MiniLM-L6-v2) that a
      merged export, which dequantizes exactly, does not reproduce;
    - a training step after an evaluation goes through `bitsandbytes::gemv_4bit`, which has
      no backward: the layers below get no gradient through the layer, or, where it has a
      bias, the step raises;
    - saving undoes the repacking (`_convert_weight_packed_for_cpu_inverse`) by quantizing
      the rounded scales again, so the frozen base drifts with every evaluation + save.
    `support_avx512bf16_for_cpu`, set per layer in `Linear4bit.__init__` from
    `has_avx512bf16()`, is the switch: cleared, the layer takes the dequantize + matmul path
    of every other CPU and of the GPU. Remove this when bitsandbytes leaves the training
    layout alone (e.g. repacks a copy, or only for inference-only models); until then it
    costs only the faster bf16 CPU inference kernel."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def default_target_modules(model: torch.nn.Module) -> list[str] | str:
    """peft's per-architecture default (BERT query/value, GPT-2 c_attn, Llama q/v_proj),
    or every linear layer for architectures peft does not list."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
    return list(targets) if targets else "all-linear"


NEW_MODULES = "_trainer_new_modules"  # on a loaded model: the modules its checkpoint lacked
NEW_PARAMETERS = "_trainer_new_parameters"  # ... and those parameters, by name


def record_new_modules(model: torch.nn.Module, missing_keys) -> None:
    """Remember the parameters the checkpoint lacked (transformers drew them at random) and
    their modules: for `attach_adapter`, and for the head warm-up (run/optim.py). A tied
    weight (BERT's MLM decoder is the word embeddings) is loaded, so never among them."""
    parameters = dict(model.named_parameters())
    new = sorted(key for key in missing_keys if key in parameters)
    setattr(model, NEW_PARAMETERS, new)
    setattr(model, NEW_MODULES, sorted({key.rsplit(".", 1)[0] for key in new}))


def _new_modules_to_save(model: torch.nn.Module, to_save: list[str]) -> list[str]:
    """Modules drawn at random on load (e.g. the pooler of a BERT saved without one) that no
    entry of `to_save` covers yet: frozen under LoRA and left out of the adapter, they would
    be drawn again, differently, by every tool that loads the adapter onto its base. Trained
    and saved in full instead. peft matches `modules_to_save` as endings of module names."""
    found = []
    for name in getattr(model, NEW_MODULES, ()):
        parts = name.split(".")
        scopes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        if not any(scope.endswith(entry) for scope in scopes for entry in to_save):
            found.append(name)
    return found


def attach_adapter(
    model: torch.nn.Module,
    cfg: PeftConfig,
    spec: TaskSpec,
    gradient_checkpointing: bool,
    sharded: bool = False,
    revision: str | None = None,
) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter (after k-bit preparation for QLoRA, except
    when sharded: that preparation upcasts every non-4-bit weight, embeddings included, to
    fp32, where sharded QLoRA keeps the frozen base in its storage dtype as trl does;
    build_model already sets gradient checkpointing up)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora" and not sharded:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    targets = cfg.target_modules or spec.lora_targets or default_target_modules(model)
    options = dict(cfg.options)
    # the task head always trains in full; peft.options may add more (e.g. BERT's pooler)
    to_save = [*spec.modules_to_save, *(options.pop("modules_to_save", None) or [])]
    new = _new_modules_to_save(model, to_save)
    if new:  # a module trained in full is not also a LoRA target (all-linear would take it)
        options["exclude_modules"] = [*(options.get("exclude_modules") or []), *new]
        to_save += new
    try:
        lora = LoraConfig(
            task_type=spec.peft_task_type,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            modules_to_save=to_save or None,
            revision=revision,  # of the base: adapter_config.json records it for loading
            **options,
        )
    except TypeError as err:
        raise UserError(f"peft.options: {err}") from None
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise UserError(f"peft.target_modules: {str(err).splitlines()[0]}") from None


def load_adapter(base: torch.nn.Module, path: str | Path, name: str = "default") -> PeftModel:
    """Attach a saved adapter (and the heads saved with it) to its loaded base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path), adapter_name=name)


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` carries adapters, without importing peft: a model can only be a
    PeftModel once peft has been imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)
