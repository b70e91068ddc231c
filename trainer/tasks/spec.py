"""What a task is: one `TaskSpec` holds everything that differs between tasks.

The training loop, evaluation, `trainer predict`, model loading, LoRA, the data reader and
the launch planner never ask which task they serve; they read the spec. A task is its
spec (trainer/tasks/<task>.py) plus, where it needs them, a row format (data/read.py), an
encoder (data/encode.py) and a collator (data/collate.py).

A spec is read by config validation, which must reject a bad config in well under a second,
before torch (2.5 s) is imported. So a spec's facts are plain values, and its behaviour is
plain functions that import what they need when first called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.data.read import TEXT_WITH_ID, RowFormat

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from trainer.config import DataConfig, RunConfig
    from trainer.data.read import Split
    from trainer.data.stream import ShardSource, SourceBlocks
    from trainer.tasks.metrics import LossMetrics

# Metrics (of any task) where lower is better; the best model minimises them.
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "mlm_loss", "nsp_loss"})

Loss = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]  # (logits, labels[, weight])
# (tokenizer, row, data) -> the prompt's token ids and the reference answer (None: the row
# has none), or None when the row gives no prompt (data.truncation=drop drops it)
EvalPrompt = Callable[..., "tuple[list[int], str | None] | None"]
# (model, batch) -> (loss sum, its target count, the sums of the spec's `logged` values)
Objective = Callable[..., "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class SequenceHead:
    """A sequence-level classification objective trained next to the task's own loss (NSP
    next to MLM). Its loss is a sum with its own target count, so the loop can make it a
    mean over all of its targets, as it does for the task's tokens."""

    name: str  # logged as `<name>_loss`, evaluated as `<name>_loss` and `<name>_accuracy`
    logits_key: str  # where the model output holds its logits
    labels_key: str  # where the batch holds its labels

    def loss(self, output, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the batch's sequences, and how many there were."""
        from trainer.tasks.losses import token_loss

        return token_loss(output[self.logits_key], batch[self.labels_key])

    def count(self, batch: dict) -> torch.Tensor:
        """Targets in a batch before the forward pass (for the accumulation-window total)."""
        from trainer.data.encode import IGNORE_INDEX

        return (batch[self.labels_key] != IGNORE_INDEX).sum()

    def correct(self, output, batch: dict) -> torch.Tensor:
        """Sequences whose predicted class is the label (for accuracy at evaluation)."""
        return (output[self.logits_key].argmax(-1) == batch[self.labels_key]).sum()


@dataclass(frozen=True)
class PredictionHead:
    """What `trainer predict` makes of a task's model outputs (trainer/tasks/heads.py)."""

    run: Callable[..., list[dict]]  # (predictor, examples, padded inputs, options) -> rows
    word_offsets: bool = False  # NER: each token keeps its word and its character span
    generates: bool = False  # CLM: prompts are padded on the left and keep their end
    chat: bool = False  # sft: a prompt is the user's turn, rendered by the chat template
    inputs: RowFormat = TEXT_WITH_ID  # what a row of predict's --input holds


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific: facts first, then behaviour."""

    name: str  # the `task` key's value
    auto_class: str  # the transformers Auto class that loads a model with the task's head
    architectures: tuple[str, ...]  # class-name endings of saved models with this head
    metrics: tuple[str, ...]  # what evaluation reports; the first is the default eval.metric
    rows: RowFormat  # what a data row holds, and how plain-text files read
    encode: Callable[
        [Split, PreTrainedTokenizerBase, list[str] | None, DataConfig], datasets.Dataset
    ]
    make_collator: Callable[[PreTrainedTokenizerBase, RunConfig], Callable]
    loss: Loss
    make_metrics: Callable[[list[str] | None, DataConfig], LossMetrics]  # (names, data)
    lengths: Callable[[PreTrainedTokenizerBase, list[dict]], list[int]]  # tokens per row
    prediction: PredictionHead
    pipeline_tag: str  # the Hub's and transformers.pipeline's name for the task (model cards)
    packed: bool = False  # texts are packed into max_length blocks (MLM, CLM)
    # data.packing: examples (sft) or the pairs' sequences (preference) packed into rows
    packs_examples: bool = False
    augmentable: bool = False  # EDA edits of whole texts keep the label (data.augment)
    peft_task_type: str | None = None  # peft's TaskType; None: the generic PeftModel
    modules_to_save: tuple[str, ...] = ()  # trained in full next to a LoRA adapter (heads)
    lora_targets: str | None = None  # peft.target_modules when unset; None: peft's default
    required_tokens: tuple[str, ...] = ()  # tokenizer attributes the task cannot do without
    shifted_targets: bool = False  # CLM: position t predicts token t + 1
    # data.streaming: one shard of a train source as blocks made on the fly (MLM/CLM: packed
    # documents; sft: its examples, packed with data.packing); None: read into memory
    stream_blocks: (
        Callable[[PreTrainedTokenizerBase, DataConfig, ShardSource], SourceBlocks] | None
    ) = None
    logits_key: str = "logits"  # where the model output holds the logits `loss` reads
    extra_heads: tuple[SequenceHead, ...] = ()
    own_loss_name: str = ""  # with extra heads: the name `loss` is logged under (mlm_loss)
    targets_only: bool = False  # MLM: project labelled positions only (run/forward.py)
    check_model_config: Callable[[PretrainedConfig], None] | None = None  # before loading
    # before its first use in training (sft: data.chat_template goes onto the tokenizer)
    prepare_tokenizer: Callable[[PreTrainedTokenizerBase, DataConfig], None] | None = None
    # sft (data-stats): what each data.truncation policy does to the rows over max_length
    truncation: Callable[[PreTrainedTokenizerBase, list[dict], DataConfig], dict] | None = None
    # eval.generate (tasks whose prediction head generates): a validation row's prompt
    eval_prompt: EvalPrompt | None = None
    # what eval.generate adds to the metrics where the rows carry reference answers (sft);
    # higher is better, and eval.metric may name them while eval.generate is on
    answer_metrics: tuple[str, ...] = ()
    # An objective over whole sequences that replaces forward + `loss` (preference pairs:
    # it scores chosen and rejected, and may hold a reference model), built once the model
    # is: (run config, model, device, sharded, PreparedData) -> Objective; it may add
    # columns to the encoded data (precomputed reference scores).
    make_objective: Callable[..., Objective] | None = None
    # once Accelerate prepared the model: (run config, prepared model, accelerator,
    # PreparedData) -> whether it added columns to the encoded data (preference: the
    # reference scores make_objective could not compute from the weights ZeRO-3/FSDP shard
    # at loading, which only the prepared model runs)
    after_prepare: Callable[..., bool] | None = None
    # what an objective's loss is normalised by, counted in a batch before the forward
    # pass (pairs); None: the labelled tokens
    count_targets: Callable[[dict], torch.Tensor] | None = None
    logged: tuple[str, ...] = ()  # values an objective sums per target, logged as means
    sequences_per_example: int = 1  # preference: a pair is two sequences in one forward
    # whether a run holds a frozen copy of the initial model next to the trained one
    # (preference: DPO/IPO in full fine-tuning), for `trainer plan`'s memory
    frozen_copy: Callable[[RunConfig], bool] | None = None
    # why the run can't train with weights that ZeRO-3/FSDP shard, or None (preference: a
    # frozen copy next to the sharded model), for `trainer launch` to say before the start
    sharding_error: Callable[[RunConfig], str | None] | None = None

    def targets(self, batch: dict, weight: Any = None) -> Any:
        """Targets in a batch before the forward pass (for the accumulation-window total):
        the labelled tokens (by class weight), or what `count_targets` counts."""
        if self.count_targets is not None:
            return self.count_targets(batch)
        from trainer.tasks.losses import count_targets

        return count_targets(batch["labels"], self.shifted_targets, weight)

    # train.head_warmup_ratio when unset: the share of the steps in which only parameters
    # the checkpoint lacked learn (benchmarks/dapt.py measured it downstream)
    head_warmup_ratio: float = 0.0

    @property
    def has_labels(self) -> bool:
        """Label names come from the data (classification, NER)."""
        return self.rows.labelled


def label_ids(names: list[str] | None) -> dict[str, int]:
    """Label name -> id, in the order the names are given."""
    return {name: i for i, name in enumerate(names or [])}


# --- behaviour shared by several tasks (imported when first called) ------------------------


def token_loss(logits: Any, labels: Any, weight: Any = None) -> tuple[Any, Any]:
    """Summed cross-entropy over labelled positions and their count (tasks/losses.py)."""
    from trainer.tasks import losses

    return losses.token_loss(logits, labels, weight)


def padding_collator(tokenizer: PreTrainedTokenizerBase, cfg: RunConfig) -> Callable:
    """Examples padded to the longest of their batch (fine-tuning tasks)."""
    from trainer.data.collate import PaddingCollator

    return PaddingCollator(tokenizer.pad_token_id)


def text_lengths(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[int]:
    """Tokens per text as fine-tuning encodes it, special tokens included."""
    from trainer.data import encode

    return encode.token_counts(tokenizer, [row["text"] for row in rows])
