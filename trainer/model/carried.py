"""Weights of the source checkpoint's base model that the run's model has no place for,
carried unchanged into every model folder the run saves (best/, final/, a checkpoint's
model/, a merged export).

transformers' masked-LM classes build their base model without its pooling layer
(`BertForMaskedLM` holds `BertModel(config, add_pooling_layer=False)`, as do RoBERTa's,
ELECTRA's and their kin), so domain-adaptive pretraining (task mlm) from a checkpoint that
has a pooler (all-MiniLM-L6-v2, any `BertModel` or classifier checkpoint) loads it as
unexpected and, left to save_pretrained, drops it: a sequence-classification fine-tune
from that final/ then starts from a random pooler where one from the original checkpoint
starts from the pretrained one, which can make the adaptation look harmful (issue 18).
The run never trains those tensors, so the source's own values are the right ones.

Only base-model tensors are carried: the head of another task (a classifier's
`classifier.*` loaded into an MLM) belongs to that task, which retrains it.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from trainer.model.labelled_base import weight_index

CARRIED = "_trainer_carried"  # on a loaded model: saved name -> the source's tensor (CPU)


def record(model: torch.nn.Module, unexpected_keys, source: str, revision: str | None) -> None:
    """Keep, on `model`, the source's tensors of its base model that transformers loaded
    as unexpected (read from `source`'s weight files once, at load), under the names the
    run's model saves its base model with (`bert.` in front of a `BertModel`
    checkpoint's `pooler.dense.weight`)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not unexpected_keys or not prefix or getattr(model, prefix, None) is None:
        return
    index = weight_index(source, revision)
    if index is None:
        return
    files = index[1]
    # A checkpoint of a base model alone names its tensors without the prefix.
    base_only = not any(name.startswith(f"{prefix}.") for name in files)
    wanted = {}
    for key in sorted(unexpected_keys):
        if key not in files:  # renamed on load (a legacy name): not found as it was saved
            continue
        if key.startswith(f"{prefix}."):
            wanted[key] = key
        elif base_only:
            wanted[f"{prefix}.{key}"] = key
    if wanted:
        setattr(model, CARRIED, _read(wanted, files))


def _read(wanted: dict[str, str], files: dict[str, str]) -> dict[str, torch.Tensor]:
    """saved name -> the tensor stored under its checkpoint name, from safetensors or
    (weights only) pickled weight files, each file opened once."""
    found = {}
    for path in sorted({files[key] for key in wanted.values()}):
        here = {saved: key for saved, key in wanted.items() if files[key] == path}
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                found.update({saved: handle.get_tensor(key) for saved, key in here.items()})
        else:
            stored = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            found.update({saved: stored[key].clone() for saved, key in here.items()})
    return found


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The carried tensors of a loaded model (none for most), to save next to its own."""
    return dict(getattr(model, CARRIED, {}))
