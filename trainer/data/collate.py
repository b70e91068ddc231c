"""Batching examples: dynamic padding, and MLM masking that is the same on any rank layout.

MLM masking draws from a generator seeded per example (from the run seed, the epoch and
the example index) rather than from the global RNG. The same example therefore gets the
same mask whether it is processed by rank 0 of 1 or rank 1 of 2, and again after a
resume, while it still changes every epoch (dynamic masking, as in RoBERTa).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from trainer.data.encode import IGNORE_INDEX

if TYPE_CHECKING:
    from trainer.config import MlmConfig

Example = dict[str, list]
Batch = dict[str, torch.Tensor]


def example_seed(run_seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed per (run, epoch, example), stable across processes."""
    mixed = (run_seed * 1_000_003 + epoch) * 2_147_483_647 + index
    return mixed % (2**63 - 1)


def _pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(seq) for seq in sequences)
    return torch.tensor([seq + [value] * (width - len(seq)) for seq in sequences])


@dataclass
class PaddingCollator:
    """Pad to the longest example in the micro-batch (classification and NER)."""

    pad_token_id: int

    def __call__(self, examples: list[Example]) -> Batch:
        batch = {"input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id)}
        batch["attention_mask"] = _pad([[1] * len(e["input_ids"]) for e in examples], 0)
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], 0)
        labels = [e["labels"] for e in examples]
        batch["labels"] = (
            _pad(labels, IGNORE_INDEX) if isinstance(labels[0], list) else torch.tensor(labels)
        )
        return batch


def packs_by_position(attn_implementation: str | None) -> bool:
    """Whether packed examples reach attention as one row of the micro-batch's tokens, with
    position ids restarting in each example and no attention mask: flash attention (2, 3,
    or a kernels-hub flash variant) takes no 4-D mask, and transformers sends it down its
    variable-length path when the position ids of a single row restart
    (modeling_flash_attention_utils._is_packed_sequence, which needs batch size 1).
    Eager and SDPA (and unset: transformers' SDPA) get the 4-D block-diagonal mask, which
    BERT's bidirectional attention needs (it builds none from position ids)."""
    from transformers.utils.generic import is_flash_attention_requested

    return is_flash_attention_requested(requested_attention_implementation=attn_implementation)


def one_row(batch: Batch, real: torch.Tensor) -> Batch:
    """The batch's `real` tokens (no padding) as a single row [1, tokens], end to end, with
    their position ids and without the attention mask (see `packs_by_position`); every
    position is a token (`real_mask`). Each row must already keep a target from crossing
    into the next: next-token labels ignore every example's first token."""
    row = {key: value[real][None] for key, value in batch.items() if key != "attention_mask"}
    return row | {"real_mask": torch.ones_like(row["input_ids"])}


@dataclass
class PackedExamplesCollator:
    """Rows of packed examples (sft with data.packing), padded to the longest row of the
    micro-batch: each example attends only to itself, its position ids start at 0, and
    each padding position is an example of its own that no real token sees. `real_mask`
    (not a model input) says which positions are tokens, for the tokens/s count. With
    `by_position` (flash attention) the rows become one, without padding (`one_row`)."""

    pad_token_id: int
    by_position: bool = False

    def __call__(self, examples: list[Example]) -> Batch:
        batch, starts = self.padded(examples)
        return isolated(batch, starts, causal=True, by_position=self.by_position)

    def padded(self, examples: list[Example]) -> tuple[Batch, torch.Tensor]:
        """The rows padded, with where each example (and each padding position) starts."""
        width = max(len(e["input_ids"]) for e in examples)
        batch = {
            "input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id),
            "labels": _pad([e["labels"] for e in examples], IGNORE_INDEX),
        }
        starts = torch.ones(len(examples), width, dtype=torch.bool)  # padding: each alone
        for row, example in enumerate(examples):
            starts[row, : sum(example["example_lengths"])] = False
            offset = 0
            for length in example["example_lengths"]:
                starts[row, offset] = True
                offset += length
        lengths = torch.tensor([sum(e["example_lengths"]) for e in examples])
        batch["real_mask"] = (torch.arange(width)[None] < lengths[:, None]).long()
        return batch, starts


def isolate_documents(starts: torch.Tensor, causal: bool) -> dict[str, torch.Tensor]:
    """Attention that stays inside each packed document, given where documents start.

    Returns a 4-D additive mask (0 where a token may attend, the float minimum elsewhere;
    Hugging Face models take it as-is with eager and SDPA attention) that is block-diagonal
    per document (and causal for CLM), and position ids that restart at 0 in every
    document, so a packed document is computed as if it were alone in its sequence."""
    length = starts.shape[-1]
    document = starts.long().cumsum(-1)
    allowed = document[:, :, None] == document[:, None, :]
    if causal:
        allowed &= torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return {"attention_mask": mask[:, None], "position_ids": document_positions(starts)}


def document_positions(starts: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document start (and at each row's start)."""
    here = torch.arange(starts.shape[-1]).expand_as(starts)
    first = torch.where(starts, here, 0).cummax(-1).values
    return here - first


def isolated(batch: Batch, starts: torch.Tensor, causal: bool, by_position: bool) -> Batch:
    """`batch` with its documents isolated: under the 4-D mask, or (`by_position`) as one
    row of its `real_mask` tokens with their position ids (`one_row`)."""
    if not by_position:
        return batch | isolate_documents(starts, causal)
    real = batch.pop("real_mask", torch.ones_like(starts)).bool()
    return one_row(batch | {"position_ids": document_positions(starts)}, real)


@dataclass
class CausalLMCollator:
    """Packed blocks need no padding; the targets are the inputs (shifted in the loss).
    With `eos_token_id` set, each document attends only to itself (a document ends at
    its EOS token); with `by_position` too (flash attention), the blocks become one row
    (`one_row`) in which no block's first token is the target of the block before."""

    eos_token_id: int | None = None
    by_position: bool = False

    def __call__(self, examples: list[Example]) -> Batch:
        input_ids = torch.tensor([e["input_ids"] for e in examples])
        batch = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids.clone(),
        }
        if self.eos_token_id is not None:
            starts = torch.zeros_like(input_ids, dtype=torch.bool)
            starts[:, 1:] = input_ids[:, :-1] == self.eos_token_id
            if self.by_position:  # a block's first token: never a target within its block
                batch["labels"][:, 0] = IGNORE_INDEX
            return isolated(batch, starts, causal=True, by_position=self.by_position)
        return batch


@dataclass
class MaskedLMCollator:
    """BERT masking: select `mask_probability` of the tokens (or of the words), then replace
    `mask_token_fraction` of them by the mask token, `random_token_fraction` by a random
    token, and keep the rest. Only selected positions carry a label. With `isolate`, each
    packed document (from its [CLS] token on) attends only to itself; with `by_position`
    too (flash attention), the blocks become one row (`one_row`)."""

    tokenizer: PreTrainedTokenizerBase
    settings: MlmConfig
    isolate: bool = False
    by_position: bool = False

    def __call__(self, examples: list[Example]) -> Batch:
        rows = [self.mask(example) for example in examples]
        input_ids = torch.stack([ids for ids, _ in rows])
        batch = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": torch.stack([labels for _, labels in rows]),
        }
        if self.isolate:
            original = torch.tensor([e["input_ids"] for e in examples])  # before masking
            starts = original == self.tokenizer.cls_token_id
            return isolated(batch, starts, causal=False, by_position=self.by_position)
        return batch

    def mask(self, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask one packed block with its own seeded generator."""
        generator = torch.Generator().manual_seed(example["seed"])
        input_ids = torch.tensor(example["input_ids"])
        special = torch.tensor(example["special_tokens_mask"], dtype=torch.bool)
        selected = self._select(example, special, generator)
        labels = torch.where(selected, input_ids, IGNORE_INDEX)
        draw = torch.rand(input_ids.shape, generator=generator)
        to_mask = selected & (draw < self.settings.mask_token_fraction)
        random_limit = self.settings.mask_token_fraction + self.settings.random_token_fraction
        to_random = selected & ~to_mask & (draw < random_limit)
        random_ids = torch.randint(len(self.tokenizer), input_ids.shape, generator=generator)
        input_ids = torch.where(to_mask, self.tokenizer.mask_token_id, input_ids)
        return torch.where(to_random, random_ids, input_ids), labels

    def _select(
        self, example: Example, special: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        draw = torch.rand(special.shape, generator=generator)
        if not self.settings.whole_word_masking:
            return (draw < self.settings.mask_probability) & ~special
        # A word is a start token plus the non-start, non-special tokens after it; it is
        # selected (all of its tokens) when the draw at its start token falls under p.
        starts = torch.tensor(example["word_start"], dtype=torch.bool) & ~special
        word_index = torch.cumsum(starts.long(), dim=0) - 1
        word_selected = (draw < self.settings.mask_probability) & starts
        selected_words = word_selected[starts]
        inside_word = (word_index >= 0) & ~special
        if selected_words.numel() == 0:
            return torch.zeros_like(special)
        chosen = selected_words[word_index.clamp(min=0)]
        return chosen & inside_word


@dataclass
class SentencePairCollator:
    """Sentence pairs for MLM + NSP: each pair masked exactly as `masking` masks a packed
    block (its own seeded generator), then padded to the longest pair of the micro-batch;
    the next-sentence label rides along."""

    masking: MaskedLMCollator

    def __call__(self, examples: list[Example]) -> Batch:
        rows = [self.masking.mask(example) for example in examples]
        pad_id = self.masking.tokenizer.pad_token_id
        return {
            "input_ids": _pad([ids.tolist() for ids, _ in rows], pad_id),
            "attention_mask": _pad([[1] * len(ids) for ids, _ in rows], 0),
            "token_type_ids": _pad([e["token_type_ids"] for e in examples], 0),
            "labels": _pad([labels.tolist() for _, labels in rows], IGNORE_INDEX),
            "next_sentence_label": torch.tensor([e["next_sentence_label"] for e in examples]),
        }


@dataclass
class PairCollator:
    """Preference pairs as one batch: the chosen sequences, then the rejected ones in the
    same order (rows i and i + pairs are one pair), padded to the longest of all, so that
    one forward pass scores both sides."""

    pad_token_id: int

    def __call__(self, examples: list[Example]) -> Batch:
        ids = [e["input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        labels = [e["labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        batch = {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _pad([[1] * len(seq) for seq in ids], 0),
            "labels": _pad(labels, IGNORE_INDEX),
        }
        return batch | reference_scores(examples)


@dataclass
class PackedPairCollator:
    """Preference pairs packed (data.packing): the micro-batch's chosen sequences, then its
    rejected ones (sequences i and i + pairs are one pair), placed best-fit decreasing into
    rows of at most `max_length` tokens, each sequence attending only to itself with its
    own position ids, as sft's packed examples (PackedExamplesCollator; under flash
    attention one row, `by_position`). `sequence_index` says which sequence each position
    holds (-1: padding), so that the per-sequence sums come out in the order of the padded
    batch (PairCollator) and the objective reads them alike."""

    pad_token_id: int
    max_length: int
    by_position: bool = False

    def __call__(self, examples: list[Example]) -> Batch:
        from trainer.data.chat_encode import best_fit, packed_rows

        ids = [e["input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        labels = [e["labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        rows = best_fit([len(sequence) for sequence in ids], self.max_length)
        packed = packed_rows({"input_ids": ids, "labels": labels}, rows)
        batch, starts = PackedExamplesCollator(self.pad_token_id).padded(
            [dict(zip(packed, row, strict=True)) for row in zip(*packed.values(), strict=True)]
        )
        index = torch.full_like(batch["input_ids"], -1)
        for row, sequences in enumerate(rows):
            offset = 0
            for sequence in sequences:
                index[row, offset : offset + len(ids[sequence])] = sequence
                offset += len(ids[sequence])
        batch = isolated(batch | {"sequence_index": index}, starts, True, self.by_position)
        return batch | reference_scores(examples)


def reference_scores(examples: list[Example]) -> Batch:
    """Precomputed reference scores of the pairs' sequences (preference.precompute_reference),
    chosen then rejected, or nothing."""
    if "ref_chosen_logps" not in examples[0]:
        return {}
    scores = [e["ref_chosen_logps"] for e in examples] + [e["ref_rejected_logps"] for e in examples]
    return {"ref_logps": torch.tensor(scores, dtype=torch.float32)}
