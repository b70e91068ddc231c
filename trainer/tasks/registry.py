"""Every task by name, and which spec a run or a saved model uses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from trainer.tasks.classification import CLASSIFICATION
from trainer.tasks.clm import CLM
from trainer.tasks.mlm import MLM, pretraining
from trainer.tasks.preference import PREFERENCE_TASK
from trainer.tasks.sft import SFT
from trainer.tasks.spec import TaskSpec
from trainer.tasks.token_classification import TOKEN_CLASSIFICATION

if TYPE_CHECKING:
    from trainer.config import RunConfig

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (MLM, CLM, CLASSIFICATION, TOKEN_CLASSIFICATION, SFT, PREFERENCE_TASK)
}


def task_spec(cfg: RunConfig) -> TaskSpec:
    """The spec a run uses: its task's, or BERT pretraining with mlm.next_sentence (which
    config validation allows with task mlm only)."""
    return pretraining(cfg.train.seed) if cfg.mlm.next_sentence else TASKS[cfg.task]


def task_of_architectures(architectures: Iterable[str]) -> TaskSpec | None:
    """The task whose head a saved model has, from its config's class names."""
    for architecture in architectures:
        for spec in TASKS.values():
            if architecture.endswith(spec.architectures):
                return spec
    return None
