"""Preference tuning of causal LMs on chosen/rejected pairs: DPO and IPO against a
reference model, SimPO and ORPO without one (the formulas: tasks/preference_losses.py).

Rows are prompt / chosen / rejected (data/preference_rows.py), encoded through supervised
fine-tuning's chat path (data/preference_encode.py). A micro-batch holds the chosen
sequences and then the rejected ones, so one forward pass scores both sides; each side's
log-probability sums its answer tokens only.

The reference is never a second model where it need not be: under LoRA/QLoRA it is the
policy with its adapter disabled; in full fine-tuning a frozen copy of the initial weights
(on the same device, in the same dtype); for SimPO and ORPO there is none.

The loss is a sum over pairs, and the loop divides it by the pairs of the whole
accumulation window on all processes, as it divides token losses by tokens."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from trainer.data.chat_templates import set_chat_template
from trainer.data.preference_rows import PREFERENCE
from trainer.tasks import clm
from trainer.tasks.sft import SFT
from trainer.tasks.spec import TaskSpec

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

    from trainer.config import DataConfig, RunConfig
    from trainer.data.read import Split
    from trainer.tasks.metrics import PairMetrics
    from trainer.tasks.preference_losses import PairSettings

# what the log and evaluation report, as TRL names it: means per pair
LOGGED = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
)


def encode(
    split: Split, tokenizer: PreTrainedTokenizerBase, names: list[str] | None, data: DataConfig
) -> datasets.Dataset:
    """Chosen and rejected token ids with answer-only labels (data/preference_encode.py)."""
    from trainer.data.preference_encode import encode_pairs

    return encode_pairs(split, tokenizer, data)


def collator(tokenizer: PreTrainedTokenizerBase, cfg: RunConfig):
    """Chosen rows then rejected rows, padded together; with data.packing, packed into
    max_length rows, each sequence attending to itself alone."""
    from trainer.data.collate import PackedPairCollator, PairCollator, packs_by_position

    if cfg.data.packing:
        by_position = packs_by_position(cfg.model.attn_implementation)
        return PackedPairCollator(tokenizer.pad_token_id, cfg.data.max_length, by_position)
    return PairCollator(tokenizer.pad_token_id)


def lengths(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[int]:
    """Tokens per pair: its longer side, before truncation."""
    from trainer.data.preference_encode import pair_token_counts

    return pair_token_counts(tokenizer, rows)


def metrics(names: list[str] | None, data: DataConfig) -> PairMetrics:
    """The loss per pair and the logged means."""
    from trainer.tasks.metrics import PairMetrics

    return PairMetrics(LOGGED)


def pair_count(batch: dict) -> torch.Tensor:
    """Pairs in a batch: half its sequences (its rows, unless packed)."""
    if "sequence_index" in batch:
        return (batch["sequence_index"].max() + 1) // 2
    return batch["input_ids"].new_tensor(batch["input_ids"].shape[0] // 2)


class PairObjective:
    """The configured objective over a batch of pairs, with the reference it needs: a
    frozen model, the policy with its adapter disabled, or none."""

    def __init__(
        self, settings: PairSettings, reference: torch.nn.Module | None, adapter_off: bool
    ) -> None:
        self.settings = settings
        self.reference = reference
        self.adapter_off = adapter_off  # the reference is the policy without its adapter

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss over pairs, pairs, sums per pair of the LOGGED values)."""
        import torch

        from trainer.tasks.preference_losses import PairLogps, pair_losses, sequence_logps

        logps, tokens = sequence_logps(
            _logits(model, batch), batch["labels"], batch.get("sequence_index")
        )
        pairs = logps.shape[0] // 2
        scored = PairLogps(logps[:pairs], logps[pairs:], tokens[:pairs], tokens[pairs:])
        ref = batch.get("ref_logps")  # precomputed (preference.precompute_reference)
        if ref is None and (self.adapter_off or self.reference is not None):
            ref = self.reference_logps(model, batch)
        if ref is not None:
            scored.ref_chosen, scored.ref_rejected = ref[:pairs], ref[pairs:]
        loss, chosen, rejected = pair_losses(scored, self.settings)
        values = [
            chosen.sum(),
            rejected.sum(),
            (chosen > rejected).float().sum(),
            (chosen - rejected).sum(),
            scored.chosen.detach().sum(),
            scored.rejected.detach().sum(),
        ]
        return loss.sum(), pair_count(batch), torch.stack(values).float()

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        """Per sequence: the reference's summed answer log-probability (no gradient)."""
        import torch
        from accelerate.utils import extract_model_from_parallel

        from trainer.tasks.preference_losses import sequence_logps

        scorer = self.reference or extract_model_from_parallel(model)
        off = scorer.disable_adapter() if self.adapter_off else contextlib.nullcontext()
        with torch.no_grad(), off:
            logits = _logits(scorer, batch)
            return sequence_logps(logits, batch["labels"], batch.get("sequence_index"))[0]


def _logits(model, batch: dict) -> torch.Tensor:
    from trainer.run.forward import model_inputs, without_cache

    return model(**model_inputs(batch) | without_cache(model)).logits


def needs_frozen_reference(cfg: RunConfig) -> bool:
    """Whether the reference is the initial model apart from the trained one: a reference
    objective in full fine-tuning (a frozen copy, or its precomputed scores)."""
    from trainer.tasks.preference_losses import REFERENCE_FREE

    return cfg.peft.method == "none" and cfg.preference.loss not in REFERENCE_FREE


def holds_frozen_copy(cfg: RunConfig) -> bool:
    """Whether training holds a second model: a frozen reference not precomputed."""
    return needs_frozen_reference(cfg) and not cfg.preference.precompute_reference


def pair_settings(cfg: RunConfig) -> PairSettings:
    """The preference section's numbers, as the loss formulas take them."""
    from trainer.tasks.preference_losses import PairSettings

    p = cfg.preference
    return PairSettings(
        p.loss, p.beta, p.label_smoothing, p.simpo_gamma, p.orpo_lambda, p.sft_weight
    )


def sharding_error(cfg: RunConfig) -> str | None:
    """Why a frozen copy of the model can't sit next to ZeRO-3/FSDP's sharded one, and what
    to set instead (checked with the profile by `trainer launch`, and at start-up); None
    where the run holds no copy."""
    if not holds_frozen_copy(cfg):
        return None
    return (
        f"preference.loss: {cfg.preference.loss} in full fine-tuning under ZeRO-3/FSDP would "
        "need a sharded frozen reference copy, which is not supported; set "
        "preference.precompute_reference: true (the reference scored once before training), "
        "or use peft.method lora or qlora, or preference.loss simpo or orpo"
    )


def after_prepare(cfg: RunConfig, model, accelerator, data) -> bool:
    """Under ZeRO-3/FSDP: the precomputed reference scores that make_objective left out,
    from the prepared model (tasks/preference_reference.py). Returns whether it added them
    to `data`."""
    from trainer.tasks.preference_reference import COLUMNS, add_sharded_reference_scores

    if not (cfg.preference.precompute_reference and needs_frozen_reference(cfg)):
        return False
    if COLUMNS[0] in data.train[0].column_names:  # scored before `prepare`: not sharded
        return False
    scorer = PairObjective(pair_settings(cfg), None, adapter_off=False)  # scores `model`
    add_sharded_reference_scores(cfg, scorer, model, accelerator, data)
    return True


def make_objective(
    cfg: RunConfig, model: torch.nn.Module, device: torch.device, sharded: bool, data
) -> PairObjective:
    """The objective of preference.loss and its reference: none for SimPO and ORPO; the
    adapter switched off under LoRA/QLoRA; else `model` as it is now (the initial model):
    a frozen copy, or with preference.precompute_reference its scores of every pair,
    added to the encoded `data` (PreparedData) as columns that the collator batches, kept
    in the data cache (tasks/preference_reference.py); under ZeRO-3/FSDP, whose weights
    are sharded from loading on, they are scored once the model is prepared."""
    import copy

    from trainer.errors import UserError
    from trainer.tasks.preference_losses import REFERENCE_FREE

    p, settings = cfg.preference, pair_settings(cfg)
    if not needs_frozen_reference(cfg):  # SimPO/ORPO: none; LoRA/QLoRA: the adapter off
        return PairObjective(settings, None, adapter_off=p.loss not in REFERENCE_FREE)
    if p.precompute_reference:
        if not sharded:  # else scored once the model is prepared (after_prepare)
            from trainer.tasks.preference_reference import add_reference_scores

            scorer = PairObjective(settings, model.to(device), adapter_off=False)
            add_reference_scores(cfg, scorer, device, data)
        return PairObjective(settings, None, adapter_off=False)
    if sharded:
        raise UserError(sharding_error(cfg))
    reference = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    return PairObjective(settings, reference, adapter_off=False)


PREFERENCE_TASK = TaskSpec(
    name="preference",
    auto_class="AutoModelForCausalLM",
    architectures=(),  # a saved causal LM reads as clm; a preference run's folder says so
    metrics=("loss", *LOGGED),
    rows=PREFERENCE,
    encode=encode,
    make_collator=collator,
    loss=clm.loss,  # not used in training or validation: the objective replaces it
    make_metrics=metrics,
    lengths=lengths,
    prediction=SFT.prediction,  # a tuned model answers prompts or messages rows as sft's do
    peft_task_type="CAUSAL_LM",
    lora_targets="all-linear",
    required_tokens=("eos_token",),
    shifted_targets=True,
    pipeline_tag="text-generation",
    prepare_tokenizer=set_chat_template,
    make_objective=make_objective,
    after_prepare=after_prepare,
    count_targets=pair_count,
    logged=LOGGED,
    sequences_per_example=2,
    frozen_copy=holds_frozen_copy,
    sharding_error=sharding_error,
    packs_examples=True,
)
