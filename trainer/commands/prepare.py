"""`trainer prepare CONFIG`: build the tokenization cache entry of a run config ahead of
training (or find it built), without loading the model: a SLURM job runs it once before
`srun`, so that no rank of a large job sits in set-up tokenizing."""

from __future__ import annotations

from trainer.config import RunConfig
from trainer.data.prepare import prepare_data
from trainer.logs import get_logger
from trainer.model.load import load_tokenizer
from trainer.tasks.registry import task_spec

logger = get_logger(__name__)


def prepare_command(cfg: RunConfig) -> dict:
    """The cache entry's status, folder and time, and the examples it holds."""
    if cfg.data.cache_dir is None:
        logger.warning("data.cache_dir is null: nothing to prepare (every run tokenizes)")
    data, _ = prepare_data(cfg, lambda: load_tokenizer(cfg.model, task_spec(cfg)))
    return {
        **data.cache,
        "train_examples": [len(split) for split in data.train],
        "validation_examples": len(data.validation) if data.validation is not None else 0,
        "streamed": cfg.data.streaming,
    }
