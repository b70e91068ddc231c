"""The preference objectives, per pair, from per-sequence log-probabilities.

Each takes the summed log-probabilities of the chosen and rejected answers (answer tokens
only) and returns one loss per pair plus the rewards the metrics report, so that the loop
can sum the losses and divide by the pairs of the whole accumulation window.

- DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * (chosen log-ratio - rejected
  log-ratio)), the log-ratios against the reference model; with label smoothing eps, the
  conservative form of Mitchell (2023): -(1 - eps) log s(x) - eps log s(-x).
- IPO (Azar et al. 2023, eq. 17): (chosen log-ratio - rejected log-ratio - 1 / (2 beta))^2,
  on whole-sequence log-ratios as the paper writes it (TRL divides each by its length).
- SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta / |y_w| log p(y_w) - beta / |y_l|
  log p(y_l) - gamma): length-normalised, a target margin gamma, no reference model.
- ORPO (Hong et al. 2024, eqs. 6-7): the chosen answer's NLL per token plus lambda times
  -log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = p / (1 - p) with p the
  per-token mean probability exp(mean log p); no reference model.
- With `sft_weight` alpha (DPO, IPO, SimPO): alpha times the chosen answer's NLL per token
  is added to each pair's loss (RPO, Pang et al. 2024, eq. 4). DPO alone pushes the
  rejected answer down faster than it pulls the chosen one up, and both fall (measured on
  data/preference: greedy exact match 0.505 after SFT, 0.43 after DPO on top); the NLL
  term keeps the chosen answers likely. TRL's `loss_type=["sigmoid", "sft"]` takes the
  mean over all chosen tokens of the batch; here each pair's per-token mean, so that a
  pair weighs the same in every batch and the loss still divides by the pairs.

Rewards follow TRL: beta * (policy - reference) log-probabilities for DPO and IPO; beta
times the mean per-token log-probability for SimPO, lambda times it for ORPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REFERENCE_FREE = frozenset({"simpo", "orpo"})


@dataclass
class PairLogps:
    """Per pair: summed answer log-probabilities under the policy and the reference (None
    for the reference-free objectives), and the answers' token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sigmoid DPO per pair; label smoothing assumes that share of labels flipped."""
    logits = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float
) -> torch.Tensor:
    """IPO per pair: the log-ratio margin regressed onto 1 / (2 beta)."""
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


def simpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """SimPO per pair, from the answers' mean per-token log-probabilities."""
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean_logps) < 1, computed without forming 1 - p."""
    return mean_logps - torch.log(-torch.expm1(mean_logps))


def orpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, lam: float
) -> torch.Tensor:
    """ORPO per pair: the chosen answer's per-token NLL plus lambda times the odds-ratio
    term."""
    odds_ratio = -F.logsigmoid(log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps))
    return -chosen_mean_logps + lam * odds_ratio


@dataclass(frozen=True)
class PairSettings:
    """The preference section of the config, as the objectives read it."""

    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    sft_weight: float = 0.0


def pair_losses(
    logps: PairLogps, settings: PairSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the loss of `settings.loss` (with the NLL term of `settings.sft_weight`),
    the chosen reward and the rejected reward."""
    loss, chosen, rejected = _objective(logps, settings)
    if settings.sft_weight:
        loss = loss - settings.sft_weight * logps.chosen / logps.chosen_tokens.clamp(min=1)
    return loss, chosen, rejected


def _objective(
    logps: PairLogps, settings: PairSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the loss of `settings.loss` alone and the two rewards."""
    name, beta = settings.loss, settings.beta
    if name in REFERENCE_FREE:
        chosen = logps.chosen / logps.chosen_tokens.clamp(min=1)
        rejected = logps.rejected / logps.rejected_tokens.clamp(min=1)
        if name == "simpo":
            loss = simpo_loss(chosen, rejected, beta, settings.simpo_gamma)
            return loss, beta * chosen.detach(), beta * rejected.detach()
        loss = orpo_loss(chosen, rejected, settings.orpo_lambda)
        scale = settings.orpo_lambda
        return loss, scale * chosen.detach(), scale * rejected.detach()
    chosen = logps.chosen - logps.ref_chosen
    rejected = logps.rejected - logps.ref_rejected
    if name == "ipo":
        loss = ipo_loss(chosen, rejected, beta)
    else:
        loss = dpo_loss(chosen, rejected, beta, settings.label_smoothing)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, sequence_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its labelled tokens (position t predicts
    token t + 1) and how many there were. Log-probabilities in fp32 whatever the logits'
    dtype: a bf16 log-softmax over the vocabulary loses the small differences DPO trains on.
    A sequence is a row, or with `sequence_index` (packed rows: the sequence each position
    holds) the positions of that number; no sum crosses two sequences, because a packed
    sequence's first token is never a target."""
    from trainer.data.encode import IGNORE_INDEX

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    if sequence_index is None:
        return picked.sum(-1), mask.sum(-1)
    where = sequence_index[:, 1:].clamp(min=0).flatten()
    count = int(sequence_index.max()) + 1
    sums = picked.new_zeros(count).index_add_(0, where, picked.flatten())
    return sums, mask.new_zeros(count, dtype=torch.long).index_add_(0, where, mask.flatten().long())
