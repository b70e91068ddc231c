"""A saved model folder, read once: a run's `final/` or `best/` (a full model, or a LoRA /
QLoRA adapter with its heads), a folder `trainer export` wrote, or any Hugging Face model
folder. `trainer evaluate`, `trainer predict` and `trainer export` all start here.

Reading parses `config.json` (architectures, label names; an adapter's is in its `base/`,
trainer/model/labelled_base.py), the run config the model was trained with
(`trainer_config.yaml`, absent from a plain Hugging Face folder) and, for an adapter,
`adapter_config.json` (its base), each once; loading reuses what was read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from trainer.config import ModelConfig, PeftConfig, RunConfig, build_config
from trainer.errors import UserError
from trainer.model import adapters, dtypes, labelled_base
from trainer.model.labelled_base import BASE_DIR
from trainer.model.load import load_model
from trainer.run.resume import loop_state_file, read_loop_state
from trainer.tasks.registry import TASKS, task_of_architectures
from trainer.tasks.spec import TaskSpec
from trainer.yaml_sections import apply_overrides, read_yaml

RUN_CONFIG_NAME = "trainer_config.yaml"  # inside a saved model: how it was trained
CHECKPOINT_MODEL = "model"  # inside checkpoints/step-N/: the model, saved as final/ is
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_ADAPTER = "default"  # the name a folder's own adapter gets (peft's default name)


def _no_checkpoint_model(checkpoint: Path, key: str) -> str:
    """Why checkpoint `checkpoint` has no model/ to open, and the way out: a full model
    under ZeRO / FSDP is saved only in its shards (trainer/run/checkpoint.py), which the
    backends' own tools gather into one state dict."""
    backend = read_loop_state(checkpoint).get("backend")
    where = f"{key}: checkpoint {checkpoint} has no model/"
    if backend == "deepspeed":
        return (
            f"{where}: its weights are DeepSpeed ZeRO partitions; gather them with DeepSpeed's "
            f"zero_to_fp32.py (python {checkpoint}/pytorch_model/zero_to_fp32.py "
            f"{checkpoint} OUT --safe_serialization), or open final/ once the run ends"
        )
    if backend == "fsdp":
        return (
            f"{where}: its weights are FSDP's torch.distributed.checkpoint (DCP) shards; gather "
            "them with python -m torch.distributed.checkpoint.format_utils dcp_to_torch "
            f"{checkpoint}/pytorch_model_fsdp_0 OUT.pt, or open final/ once the run ends"
        )
    return f"{where} (saved before checkpoints held one); open final/ or a newer checkpoint"


@dataclass
class SavedModel:
    """What a model folder holds, parsed once."""

    folder: Path
    config: PretrainedConfig  # config.json (of an adapter: base/'s, with the labels)
    trained_with: dict  # the run config it was trained with; {} for a plain HF folder
    adapter: dict | None  # adapter_config.json of a LoRA/QLoRA folder

    @classmethod
    def read(cls, folder: str | Path, key: str = "MODEL_DIR") -> SavedModel:
        """Read a folder; `key` names the option that gave it, in messages."""
        path = Path(folder)
        if (path / CHECKPOINT_MODEL).is_dir():  # a checkpoint: its model, as final/ holds it
            path = path / CHECKPOINT_MODEL
        elif loop_state_file(path) is not None:
            raise UserError(_no_checkpoint_model(path, key))
        # an adapter's config with its labels is in base/ (before base/: next to it)
        config_folder = path / BASE_DIR if (path / BASE_DIR / "config.json").is_file() else path
        if not (config_folder / "config.json").is_file():
            raise UserError(f"{key}: {folder} is not a model folder (no config.json)")
        config = AutoConfig.from_pretrained(config_folder)
        trained_with = (
            read_yaml(path / RUN_CONFIG_NAME) if (path / RUN_CONFIG_NAME).is_file() else {}
        )
        adapter = path / ADAPTER_CONFIG
        return cls(
            path,
            config,
            trained_with,
            json.loads(adapter.read_text()) if adapter.is_file() else None,
        )

    @classmethod
    def read_adapter(cls, folder: str | Path, where: str) -> SavedModel:
        """Read a folder that must hold a LoRA/QLoRA adapter; `where` names the option."""
        if not (Path(folder) / ADAPTER_CONFIG).is_file():
            raise UserError(f"{where}: not an adapter folder (no {ADAPTER_CONFIG})")
        return cls.read(folder, where)

    @property
    def is_adapter(self) -> bool:
        """A LoRA/QLoRA run rather than a full model."""
        return self.adapter is not None

    @property
    def base(self) -> str | None:
        """The base model an adapter was trained on (hub id or folder): the original that
        base/ stands in for, so that adapters of one base are known as such."""
        if self.adapter is None:
            return None
        return labelled_base.original(self.folder) or self.adapter["base_model_name_or_path"]

    @property
    def base_revision(self) -> str | None:
        """The hub revision of the base an adapter was trained on (model.revision)."""
        return self.adapter.get("revision") if self.adapter else None

    @property
    def task(self) -> TaskSpec | None:
        """The task whose head the folder has, from its architectures (None: no head)."""
        return task_of_architectures(self.config.architectures or [])

    @property
    def head_labels(self) -> list[str]:
        """Every label name of the head, in id order (placeholders included)."""
        return [self.config.id2label[i] for i in sorted(self.config.id2label)]

    @property
    def label_names(self) -> list[str] | None:
        """Label names of a fine-tuned head, or None for a base model's placeholders."""
        names = self.head_labels
        if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
            return None
        return names

    def run_config(
        self, overrides: Sequence[str] = (), evaluate_on: str | None = None
    ) -> RunConfig:
        """The run config it was trained with, pointed at this folder (and the tokenizer
        saved in it), with `overrides` applied; for `trainer evaluate`, scoring
        `evaluate_on` instead of the training data. A folder without a saved config or
        task takes the task its architecture says, or the `task=` override.

        `model.trust_remote_code` never comes from the folder: a folder from someone else
        whose config turned it on would run its own code here. Only the user's own
        `model.trust_remote_code=true` override turns it on."""
        saved = {**self.trained_with, "model": dict(self.trained_with.get("model") or {})}
        saved["model"].pop("trust_remote_code", None)
        raw = apply_overrides(saved, list(overrides))
        model = raw.setdefault("model", {})
        model.pop("tokenizer", None)
        # the folder is local: a hub revision means nothing to it (an adapter's base keeps
        # its own, base_revision)
        model.update(name_or_path=str(self.folder), from_scratch=False, revision=None)
        if evaluate_on is not None:
            raw.setdefault("data", {}).update(
                validation=evaluate_on, train=None, validation_split=0.0
            )
        if not raw.get("task"):
            if self.task is None:
                raise UserError(
                    f"task: can't tell which task {self.folder} serves; pass task="
                    + ", ".join(TASKS)
                )
            raw["task"] = self.task.name
        return build_config(raw, for_training=False)

    def load(
        self,
        spec: TaskSpec,
        tokenizer: PreTrainedTokenizerBase,
        peft: PeftConfig,
        precision: str,
        seed: int,
        base: str | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        model_dtype: str | None = None,
    ) -> torch.nn.Module:
        """The model: a full one as saved, or an adapter on its base (`base`, or the one
        recorded), quantized again for QLoRA, with the heads saved next to the adapter.
        Modules missing from the base checkpoint (e.g. the pooler of an MLM-only BERT) are
        saved with the adapter too; `seed`, the run's, redraws them only for adapters saved
        before they were. `model_dtype`: the run's model.dtype (trainer/model/dtypes.py)."""
        if not self.is_adapter:
            dtype = dtypes.base_dtype(model_dtype, "none", precision)
            folder = ModelConfig(name_or_path=str(self.folder))
            return load_model(folder, spec, tokenizer, config=self.config, dtype=dtype)
        model = self.load_base(spec, tokenizer, peft, precision, seed, base, model_dtype)
        return adapters.load_adapter(model, self.folder, adapter_name)

    def load_base(
        self,
        spec: TaskSpec,
        tokenizer: PreTrainedTokenizerBase,
        peft: PeftConfig,
        precision: str,
        seed: int,
        base: str | None = None,
        model_dtype: str | None = None,
    ) -> torch.nn.Module:
        """An adapter's base with the task's head (this folder's labels), before the adapter
        goes on: `load`'s first half, for a caller that shares the base's weights with
        models already loaded (trainer/model/shared_base.py) before attaching it."""
        dtype = dtypes.base_dtype(model_dtype, peft.method, precision)
        base_cfg = ModelConfig(
            name_or_path=base or self.base, revision=None if base else self.base_revision
        )
        quantization = adapters.quantization_config(precision) if peft.method == "qlora" else None
        return load_model(
            base_cfg, spec, tokenizer, self.label_names, seed, quantization, dtype=dtype
        )
