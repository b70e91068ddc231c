"""Causal language modelling (GPT-style): next-token prediction on packed documents."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.data.read import TEXT
from trainer.tasks import heads
from trainer.tasks.spec import PredictionHead, TaskSpec

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from trainer.config import DataConfig, RunConfig
    from trainer.data.collate import CausalLMCollator
    from trainer.data.read import Split
    from trainer.data.stream import ShardSource, SourceBlocks
    from trainer.tasks.metrics import LossMetrics


def encode(
    split: Split, tokenizer: PreTrainedTokenizerBase, names: list[str] | None, data: DataConfig
) -> datasets.Dataset:
    """Documents joined with the end-of-sequence token, packed into max_length blocks."""
    from trainer.data.encode import pack_for_clm

    return pack_for_clm(split, tokenizer, data.max_length)


def collator(tokenizer: PreTrainedTokenizerBase, cfg: RunConfig) -> CausalLMCollator:
    """Blocks with next-token labels; with data.isolate_documents, attention per document
    (a mask, or flash attention's variable-length path: data/collate.py packs_by_position)."""
    from trainer.data.collate import CausalLMCollator, packs_by_position

    eos = tokenizer.eos_token_id if cfg.data.isolate_documents else None
    return CausalLMCollator(eos, packs_by_position(cfg.model.attn_implementation))


def loss(logits: Any, labels: Any, weight: Any = None) -> tuple[Any, Any]:
    """Summed next-token cross-entropy and its count (tasks/losses.py)."""
    from trainer.tasks.losses import next_token_loss

    return next_token_loss(logits, labels, weight)


def metrics(names: list[str] | None, data: DataConfig) -> LossMetrics:
    """Loss and perplexity."""
    from trainer.tasks.metrics import LossMetrics

    return LossMetrics()


def documents(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict:
    """Each text followed by the end-of-sequence token."""
    from trainer.data.encode import clm_documents

    return clm_documents(tokenizer, texts)


def stream_blocks(
    tokenizer: PreTrainedTokenizerBase, data: DataConfig, source: ShardSource
) -> SourceBlocks:
    """data.streaming: the source's texts as `documents`, packed into blocks as they come."""
    from trainer.data.stream import document_blocks

    return document_blocks(lambda texts: documents(tokenizer, texts), data, source)


def lengths(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[int]:
    """Tokens per document, its EOS included."""
    from trainer.data.encode import document_token_counts

    return document_token_counts(documents(tokenizer, [row["text"] for row in rows]))


def eval_prompt(
    tokenizer: PreTrainedTokenizerBase, row: dict, data: DataConfig
) -> tuple[list[int], str | None] | None:
    """A validation text's first data.max_length tokens, continued by eval.generate; raw
    text has no reference answer to score. None for a text of no tokens."""
    ids = tokenizer(row["text"])["input_ids"][: data.max_length]
    return (ids, None) if ids else None


CLM = TaskSpec(
    name="clm",
    auto_class="AutoModelForCausalLM",
    architectures=("ForCausalLM", "LMHeadModel"),
    metrics=("perplexity", "loss"),
    rows=TEXT,
    encode=encode,
    make_collator=collator,
    loss=loss,
    make_metrics=metrics,
    lengths=lengths,
    prediction=PredictionHead(heads.generate, generates=True),
    pipeline_tag="text-generation",
    packed=True,
    head_warmup_ratio=0.1,
    peft_task_type="CAUSAL_LM",
    shifted_targets=True,
    stream_blocks=stream_blocks,
    eval_prompt=eval_prompt,
)
