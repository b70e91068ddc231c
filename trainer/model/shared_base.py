"""Task models of different heads that hold one base's weights once.

A classifier, an NER tagger and a masked LM on one BERT are three transformers classes
(`BertForSequenceClassification`, `...ForTokenClassification`, `...ForMaskedLM`): peft
loads an adapter into a model of the class it was trained with, and its saved keys name
that class's modules (`classifier` is a sequence head in one and a token head in the
other), so one PeftModel cannot serve them all. Each task gets its own model and its own
PeftModel instead, and the backbone inside each (`model.base_model`: `bert`,
`transformer`, ...) is made to hold the very `Parameter` objects of the first one loaded:
no copy, the same storage (data_ptr), so N tasks cost one base plus N heads and adapters.
LoRA keeps the frozen weight it wraps (`base_layer`), so the sharing survives peft.

Weights are shared only where name, shape, dtype and value agree; a module the base
checkpoint lacked (drawn at random on load, e.g. the pooler of a BERT saved as a masked
LM) stays the model's own, since each model drew its own. Any other difference means the
adapter was trained on another base, which is refused.
"""

from __future__ import annotations

import torch

from trainer.errors import UserError
from trainer.model.adapters import NEW_MODULES

Backbone = dict[str, torch.nn.Parameter]  # parameter name inside the backbone -> parameter


def _drawn_at_random(model: torch.nn.Module, name: str) -> bool:
    """Whether backbone parameter `name` belongs to a module the checkpoint lacked."""
    full = f"{model.base_model_prefix}.{name}" if model.base_model_prefix else name
    return any(full.startswith(f"{module}.") for module in getattr(model, NEW_MODULES, ()))


def backbone_parameters(model: torch.nn.Module) -> Backbone:
    """The backbone weights of a task model as loaded (before any adapter goes on), which
    later task models on the same base will hold instead of their own."""
    return {
        name: param
        for name, param in model.base_model.named_parameters()
        if not _drawn_at_random(model, name)
    }


def share_backbone(model: torch.nn.Module, shared: Backbone, where: str) -> int:
    """Make `model`'s backbone hold the `shared` parameters in place of its own (tied
    weights, such as an MLM decoder tied to the embeddings, follow); returns the bytes no
    longer held twice. `where` names the option that asked, in the error for a base that
    differs from the shared one."""
    replacement: dict[int, torch.nn.Parameter] = {}
    for name, param in model.base_model.named_parameters():
        source = shared.get(name)
        if source is None or _drawn_at_random(model, name):
            continue
        if (source.shape, source.dtype) != (param.shape, param.dtype):
            raise UserError(
                f"{where}: its base's {name} is {param.dtype} {list(param.shape)}, the loaded "
                f"base's {source.dtype} {list(source.shape)}; serve it in a separate run"
            )
        if not torch.equal(source.detach(), param.detach().to(source.device)):
            raise UserError(
                f"{where}: its base's weights differ from the loaded base's ({name}); "
                "adapters served together must be trained on the same base"
            )
        replacement[id(param)] = source
    # every module's own slot, so that a weight tied elsewhere (a decoder) is replaced too
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) in replacement:
                module._parameters[key] = replacement[id(param)]
    return sum(p.numel() * p.element_size() for p in replacement.values())


def parameter_bytes(models: list[torch.nn.Module]) -> int:
    """Bytes of the distinct parameter storages of `models` together (shared ones once)."""
    storages: dict[tuple[str, int], int] = {}
    for model in models:
        for param in model.parameters():
            storage = param.untyped_storage()
            storages[(str(param.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
