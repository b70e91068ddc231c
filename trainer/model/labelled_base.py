"""`base/` inside an adapter folder: the base as the standard tools must load it.

`transformers.pipeline(task, model=final)`, peft's `AutoPeftModelFor*.from_pretrained(final)`
and `PeftModel.from_pretrained(AutoModelFor*.from_pretrained(base_model_name_or_path), final)`
all build the base from the config found at the adapter's `base_model_name_or_path` (peft
0.21 and transformers 5 read nothing else; a `config.json` next to the adapter makes
transformers take the folder for a complete model and look for its weights). The original
base's config has no label names, and its default two labels do not fit a trained head of
three or more. So the adapter names `final/base/` as its base: the original's config with
the run's labels and head class, its tokenizer (pipeline reads the base's), and a weight
index whose shards are symbolic links to the original's own weight files: nothing is
copied, and the folder loads wherever those files stay where they are (as a local base's
path in an adapter always had to). The links are there because transformers 5.25 refuses
an index entry that leaves the folder (an absolute path or `..`: a hub repo's index must
not reach into the disk) but follows links, which its own hub cache is made of. Our writers
leave the links out of what they hash, flush and chmod (trainer/run/resume.py,
trainer/security.py): those files are the original's. The index metadata keeps the
original base's name, which our own readers load and compare (trainer/model/saved.py).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from trainer import atomic

BASE_DIR = "base"
ADAPTER_CONFIG = "adapter_config.json"
ORIGINAL_KEY = "trainer_base_model"  # in the index metadata: the base it was trained on
# (index file, single file) per weight format, in the order transformers prefers them
WEIGHT_FORMATS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def _resolve(source: str, filename: str, revision: str | None = None) -> str | None:
    """The local path of `filename` of a base folder or hub id (at `revision`: the hub
    cache holds a hub base once it was loaded), or None where the base has no such file."""
    from transformers.utils import cached_file

    return cached_file(
        source,
        filename,
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )


def _keys(weights: str) -> list[str]:
    """Tensor names of one weight file, without reading the tensors."""
    if weights.endswith(".safetensors"):
        with safe_open(weights, framework="pt") as handle:
            return list(handle.keys())
    return list(torch.load(weights, map_location="cpu", mmap=True, weights_only=True))


def weight_index(source: str, revision: str | None = None) -> tuple[str, dict[str, str]] | None:
    """(index file name, tensor name -> absolute path of the file holding it) of the base's
    own weights (at `revision` for a hub id); None for a base without weight files (a model
    built from scratch)."""
    for index_name, single_name in WEIGHT_FORMATS:
        index = _resolve(source, index_name, revision)
        if index is not None:
            shards = json.loads(Path(index).read_text())["weight_map"]
            paths = {shard: _resolve(source, shard, revision) for shard in set(shards.values())}
            if None in paths.values():
                return None
            return index_name, {
                name: str(Path(paths[shard]).resolve()) for name, shard in shards.items()
            }
        single = _resolve(source, single_name, revision)
        if single is not None:
            path = str(Path(single).resolve())
            return index_name, dict.fromkeys(_keys(path), path)
    return None


def write(peft_model, tokenizer: PreTrainedTokenizerBase, folder: Path, target: Path) -> None:
    """Write `folder/base/` for the adapter just saved in `folder` (which becomes `target`)
    and point the adapter at `target/base`. A base without weight files keeps the adapter
    pointing at it, as peft wrote it."""
    base = peft_model.get_base_model()
    source = base.name_or_path
    index = weight_index(source)
    if index is None:
        return
    index_name, weight_map = index
    labelled = folder / BASE_DIR
    labelled.mkdir()
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the tools load the base in full precision
    config.save_pretrained(labelled)
    tokenizer.save_pretrained(labelled)
    suffix = Path(dict(WEIGHT_FORMATS)[index_name]).suffix  # transformers reads it by name
    links = {
        path: f"weights-{n:05d}{suffix}"
        for n, path in enumerate(sorted(set(weight_map.values())), 1)
    }
    for path, name in links.items():
        (labelled / name).symlink_to(path)
    shards = {tensor: links[path] for tensor, path in weight_map.items()}
    metadata = {ORIGINAL_KEY: source}
    atomic.write_json(labelled / index_name, {"metadata": metadata, "weight_map": shards})
    point_adapter_at(folder, target / BASE_DIR)


def point_adapter_at(folder: Path, base: Path) -> None:
    """Make `folder`'s adapter_config.json name `base` (absolute) as its base model."""
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    adapter["base_model_name_or_path"] = str(base.resolve())
    atomic.write_json(folder / ADAPTER_CONFIG, adapter, indent=2)


def moving(folder: Path, target: Path) -> None:
    """Before `folder` is renamed `target`: its adapter names `target/base` as its base."""
    if (folder / BASE_DIR).is_dir():
        point_adapter_at(folder, target / BASE_DIR)


def original(folder: Path) -> str | None:
    """The base an adapter folder was trained on, as its `base/` records it; None for a
    folder without one (adapters saved before `base/` existed, or by other tools)."""
    for index_name, _ in WEIGHT_FORMATS:
        index = folder / BASE_DIR / index_name
        if index.is_file():
            return json.loads(index.read_text())["metadata"].get(ORIGINAL_KEY)
    return None


def copy_to(folder: Path, tmp: Path, target: Path) -> None:
    """Copy `folder/base/` (when there is one) into `tmp`, which becomes `target`, and
    point the copied adapter at `target/base`."""
    if (folder / BASE_DIR).is_dir():
        shutil.copytree(folder / BASE_DIR, tmp / BASE_DIR, symlinks=True)
        point_adapter_at(tmp, target / BASE_DIR)
