"""Masked language modelling (BERT-style), and BERT pretraining: MLM plus next-sentence
prediction on sentence pairs (`mlm.next_sentence`)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from trainer.data.read import TEXT
from trainer.tasks import heads
from trainer.tasks.spec import PredictionHead, SequenceHead, TaskSpec, token_loss

if TYPE_CHECKING:
    import datasets
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from trainer.config import DataConfig, RunConfig
    from trainer.data.collate import MaskedLMCollator, SentencePairCollator
    from trainer.data.read import Split
    from trainer.data.stream import ShardSource, SourceBlocks
    from trainer.tasks.metrics import LossMetrics, PretrainingMetrics


def encode(
    split: Split, tokenizer: PreTrainedTokenizerBase, names: list[str] | None, data: DataConfig
) -> datasets.Dataset:
    """Texts with their special tokens, packed into max_length blocks."""
    from trainer.data.encode import pack_for_mlm

    return pack_for_mlm(split, tokenizer, data.max_length)


def collator(tokenizer: PreTrainedTokenizerBase, cfg: RunConfig) -> MaskedLMCollator:
    """Masking per example and epoch (80/10/10, optionally whole words); with
    data.isolate_documents, attention per document (data/collate.py packs_by_position)."""
    from trainer.data.collate import MaskedLMCollator, packs_by_position

    by_position = packs_by_position(cfg.model.attn_implementation)
    return MaskedLMCollator(tokenizer, cfg.mlm, cfg.data.isolate_documents, by_position)


def metrics(names: list[str] | None, data: DataConfig) -> LossMetrics:
    """Loss and perplexity over the masked positions."""
    from trainer.tasks.metrics import LossMetrics

    return LossMetrics()


def documents(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict:
    """Each text with its special tokens, and what masking must know of its tokens."""
    from trainer.data.encode import mlm_documents

    return mlm_documents(tokenizer, texts)


def stream_blocks(
    tokenizer: PreTrainedTokenizerBase, data: DataConfig, source: ShardSource
) -> SourceBlocks:
    """data.streaming: the source's texts as `documents`, packed into blocks as they come."""
    from trainer.data.stream import document_blocks

    return document_blocks(lambda texts: documents(tokenizer, texts), data, source)


def lengths(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[int]:
    """Tokens per document, special tokens included."""
    from trainer.data.encode import document_token_counts

    return document_token_counts(documents(tokenizer, [row["text"] for row in rows]))


MLM = TaskSpec(
    name="mlm",
    auto_class="AutoModelForMaskedLM",
    architectures=("ForMaskedLM", "ForPreTraining"),
    metrics=("perplexity", "loss"),
    rows=TEXT,
    encode=encode,
    make_collator=collator,
    loss=token_loss,
    make_metrics=metrics,
    lengths=lengths,
    prediction=PredictionHead(heads.fill_masks),
    pipeline_tag="fill-mask",
    packed=True,
    head_warmup_ratio=0.1,
    required_tokens=("mask_token",),
    stream_blocks=stream_blocks,
    targets_only=True,
)

# --- BERT pretraining: MLM + NSP ------------------------------------------------------------

NEXT_SENTENCE = SequenceHead("nsp", "seq_relationship_logits", "next_sentence_label")


def pair_collator(tokenizer: PreTrainedTokenizerBase, cfg: RunConfig) -> SentencePairCollator:
    """Sentence pairs masked as MLM blocks are, with their next-sentence labels."""
    from trainer.data.collate import SentencePairCollator

    return SentencePairCollator(collator(tokenizer, cfg))


def pretraining_metrics(names: list[str] | None, data: DataConfig) -> PretrainingMetrics:
    """MLM perplexity and loss, NSP accuracy and loss, and their sum."""
    from trainer.tasks.metrics import PretrainingMetrics

    return PretrainingMetrics("mlm", [NEXT_SENTENCE.name])


def check_pretraining_head(config: PretrainedConfig) -> None:
    """mlm.next_sentence needs a pretraining class with an NSP head (BERT-style); others
    (RoBERTa, GPT-2, ELECTRA...) would fail later or silently train no NSP."""
    import inspect

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_PRETRAINING_MAPPING_NAMES

    from trainer.errors import UserError

    name = MODEL_FOR_PRETRAINING_MAPPING_NAMES.get(config.model_type)
    model_class = getattr(transformers, name, None) if name else None
    if (
        model_class is None
        or "next_sentence_label" not in inspect.signature(model_class.forward).parameters
    ):
        raise UserError(
            f"mlm.next_sentence: {config.model_type} models have no next-sentence head "
            f"(AutoModelForPreTraining gives {name or 'no class'}); use a BERT-style model"
        )


def pretraining(seed: int) -> TaskSpec:
    """MLM on sentence pairs plus next-sentence prediction, the pairs drawn with `seed`."""

    def encode_pairs(split, tokenizer, names, data):
        from trainer.data.sentence_pairs import encode_sentence_pairs

        return encode_sentence_pairs(split, tokenizer, data.max_length, seed)

    return replace(
        MLM,
        auto_class="AutoModelForPreTraining",
        metrics=(*MLM.metrics, "nsp_accuracy", "mlm_loss", "nsp_loss"),
        encode=encode_pairs,
        make_collator=pair_collator,
        make_metrics=pretraining_metrics,
        packed=False,
        stream_blocks=None,
        logits_key="prediction_logits",
        extra_heads=(NEXT_SENTENCE,),
        own_loss_name="mlm",
        check_model_config=check_pretraining_head,
    )
