"""Supervised fine-tuning of causal LMs: prompt/completion, chat and instruction rows, the
loss on the answers only (data/chat_rows.py reads the rows, data/chat_encode.py makes the
tokens and labels, data/chat_templates.py holds the templates).

The loss is CLM's next-token loss over the answer tokens; the loop divides it by the answer
tokens of the whole accumulation window on all processes, as for every task, so 1 x 8
micro-batches and 8 x 1 give the same step (the gradient-accumulation bug of 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.data.chat_rows import CHAT, CHAT_PROMPT
from trainer.data.chat_templates import set_chat_template
from trainer.tasks import clm, heads
from trainer.tasks.spec import PredictionHead, TaskSpec

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from trainer.config import DataConfig, RunConfig
    from trainer.data.read import Split
    from trainer.data.stream import ShardSource, SourceBlocks


def encode(
    split: Split, tokenizer: PreTrainedTokenizerBase, names: list[str] | None, data: DataConfig
) -> datasets.Dataset:
    """Token ids and answer-only labels per row (see data/chat_encode.py)."""
    from trainer.data.chat_encode import encode_chat

    return encode_chat(split, tokenizer, data)


def collator(tokenizer: PreTrainedTokenizerBase, cfg: RunConfig):
    """Rows padded per micro-batch; with data.packing, packed rows whose examples attend
    only to themselves (position ids restarting, and a block-diagonal causal mask; under
    flash attention its variable-length path instead: data/collate.py packs_by_position)."""
    from trainer.data.collate import PackedExamplesCollator, PaddingCollator, packs_by_position

    if cfg.data.packing:
        by_position = packs_by_position(cfg.model.attn_implementation)
        return PackedExamplesCollator(tokenizer.pad_token_id, by_position)
    return PaddingCollator(tokenizer.pad_token_id)


def stream_blocks(
    tokenizer: PreTrainedTokenizerBase, data: DataConfig, source: ShardSource
) -> SourceBlocks:
    """data.streaming: rows checked and encoded as in memory, packed as they come with
    data.packing (data/chat_stream.py)."""
    from trainer.data.chat_stream import example_blocks

    return example_blocks(tokenizer, data, source)


def lengths(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[int]:
    """Tokens per row, EOS included, before truncation."""
    from trainer.data.chat_encode import chat_token_counts

    return chat_token_counts(tokenizer, rows)


def truncation(tokenizer: PreTrainedTokenizerBase, rows: list[dict], data: DataConfig) -> dict:
    """Rows each data.truncation policy cuts or drops (see data/chat_encode.py)."""
    from trainer.data.chat_encode import truncation_counts

    return truncation_counts(tokenizer, rows, data)


def eval_prompt(
    tokenizer: PreTrainedTokenizerBase, row: dict, data: DataConfig
) -> tuple[list[int], str | None] | None:
    """The prompt before the row's last answer, and that answer (data/chat_encode.py)."""
    from trainer.data.chat_encode import eval_prompt as chat_prompt

    return chat_prompt(tokenizer, row, data)


SFT = TaskSpec(
    name="sft",
    auto_class="AutoModelForCausalLM",
    architectures=(),  # a saved causal LM reads as clm; an sft run's folder says sft itself
    metrics=("loss", "perplexity"),
    rows=CHAT,
    encode=encode,
    make_collator=collator,
    loss=clm.loss,  # CLM's next-token loss; the labels hold the answers only
    make_metrics=clm.metrics,
    lengths=lengths,
    prediction=PredictionHead(heads.generate, generates=True, chat=True, inputs=CHAT_PROMPT),
    peft_task_type="CAUSAL_LM",
    # every linear layer, as QLoRA's paper found necessary to match full fine-tuning
    lora_targets="all-linear",
    required_tokens=("eos_token",),
    shifted_targets=True,
    pipeline_tag="text-generation",
    prepare_tokenizer=set_chat_template,
    truncation=truncation,
    eval_prompt=eval_prompt,
    answer_metrics=("exact_match", "contains"),
    stream_blocks=stream_blocks,
    packs_examples=True,
)
