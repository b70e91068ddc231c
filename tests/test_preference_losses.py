"""The preference objectives against their papers' formulas, on hand-made log-probabilities
(computed here in plain floats with `math`)."""

import math

import pytest
import torch

from trainer.data.encode import IGNORE_INDEX
from trainer.tasks.preference_losses import (
    PairLogps,
    PairSettings,
    dpo_loss,
    ipo_loss,
    log_odds,
    orpo_loss,
    pair_losses,
    sequence_logps,
    simpo_loss,
)

# two pairs: summed answer log-probabilities (policy, reference) and answer lengths
POLICY_C, POLICY_R = [-4.0, -9.0], [-6.5, -7.0]
REF_C, REF_R = [-5.0, -8.0], [-6.0, -7.5]
LEN_C, LEN_R = [4, 6], [5, 3]


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _logps() -> PairLogps:
    return PairLogps(_t(POLICY_C), _t(POLICY_R), _t(LEN_C), _t(LEN_R), _t(REF_C), _t(REF_R))


def test_dpo_is_the_sigmoid_of_the_scaled_log_ratio_margin():
    beta = 0.1
    expected = []
    for pc, pr, rc, rr in zip(POLICY_C, POLICY_R, REF_C, REF_R, strict=True):
        expected.append(-_log_sigmoid(beta * ((pc - rc) - (pr - rr))))
    got = dpo_loss(_t(POLICY_C) - _t(REF_C), _t(POLICY_R) - _t(REF_R), beta)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    # at equal policy and reference every pair costs log 2
    assert dpo_loss(_t([0.0]), _t([0.0]), beta).item() == pytest.approx(math.log(2))


def test_dpo_label_smoothing_is_the_conservative_mixture():
    beta, eps = 0.5, 0.2
    c, r = 1.3, -0.4  # log-ratios
    x = beta * (c - r)
    expected = -(1 - eps) * _log_sigmoid(x) - eps * _log_sigmoid(-x)
    assert dpo_loss(_t([c]), _t([r]), beta, eps).item() == pytest.approx(expected, abs=1e-12)


def test_ipo_regresses_the_margin_onto_half_inverse_beta():
    beta = 0.25
    c, r = 1.0, -0.5
    assert ipo_loss(_t([c]), _t([r]), beta).item() == pytest.approx((1.5 - 2.0) ** 2)
    # zero exactly at the target margin 1 / (2 beta)
    assert ipo_loss(_t([2.0]), _t([0.0]), beta).item() == 0.0


def test_simpo_uses_length_normalised_log_probabilities_and_a_margin():
    beta, gamma = 2.0, 0.5
    expected = [
        -_log_sigmoid(beta * pc / lc - beta * pr / lr - gamma)
        for pc, pr, lc, lr in zip(POLICY_C, POLICY_R, LEN_C, LEN_R, strict=True)
    ]
    got = simpo_loss(_t(POLICY_C) / _t(LEN_C), _t(POLICY_R) / _t(LEN_R), beta, gamma)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_orpo_is_nll_plus_lambda_times_the_log_odds_ratio_term():
    lam = 0.1
    expected = []
    for pc, pr, lc, lr in zip(POLICY_C, POLICY_R, LEN_C, LEN_R, strict=True):
        p_w, p_l = math.exp(pc / lc), math.exp(pr / lr)
        ratio = math.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
        expected.append(-pc / lc - lam * _log_sigmoid(ratio))
    got = orpo_loss(_t(POLICY_C) / _t(LEN_C), _t(POLICY_R) / _t(LEN_R), lam)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    # log odds of a probability near 1 stays finite
    assert torch.isfinite(log_odds(torch.tensor([-1e-6]))).all()


def test_pair_losses_rewards_follow_trl():
    beta = 0.1
    loss, chosen, rejected = pair_losses(_logps(), PairSettings("dpo", beta=beta))
    assert chosen.tolist() == pytest.approx(
        [beta * (p - r) for p, r in zip(POLICY_C, REF_C, strict=True)]
    )
    assert rejected.tolist() == pytest.approx(
        [beta * (p - r) for p, r in zip(POLICY_R, REF_R, strict=True)]
    )
    assert loss.tolist() == pytest.approx(
        dpo_loss(_t(POLICY_C) - _t(REF_C), _t(POLICY_R) - _t(REF_R), beta).tolist()
    )
    free = PairLogps(_t(POLICY_C), _t(POLICY_R), _t(LEN_C), _t(LEN_R))  # no reference
    _, chosen, _ = pair_losses(free, PairSettings("simpo", beta=2.0))
    assert chosen.tolist() == pytest.approx(
        [2.0 * p / n for p, n in zip(POLICY_C, LEN_C, strict=True)]
    )


def test_sft_weight_adds_the_chosen_nll_per_token_and_leaves_the_rewards():
    """RPO (Pang et al. 2024, eq. 4): DPO + alpha * -log p(y_w | x) / |y_w|, per pair."""
    plain = pair_losses(_logps(), PairSettings("dpo", beta=0.1))
    loss, chosen, rejected = pair_losses(_logps(), PairSettings("dpo", beta=0.1, sft_weight=0.5))
    nll = [-p / n for p, n in zip(POLICY_C, LEN_C, strict=True)]
    assert (loss - plain[0]).tolist() == pytest.approx([0.5 * v for v in nll])
    assert chosen.tolist() == plain[1].tolist() and rejected.tolist() == plain[2].tolist()


def test_sft_weight_with_orpo_is_refused():
    from trainer.config import build_config
    from trainer.errors import UserError

    raw = {"task": "preference", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    raw["preference"] = {"loss": "orpo", "sft_weight": 1.0}
    with pytest.raises(UserError) as refused:
        build_config(raw, for_training=True)
    assert "preference.sft_weight: orpo has its own SFT term" in str(refused.value)
    raw["preference"] = {"sft_weight": -1.0}
    with pytest.raises(UserError) as refused:
        build_config(raw, for_training=False)
    assert str(refused.value) == "preference.sft_weight: must be >= 0, got -1.0"


def test_sequence_logps_sums_the_labelled_next_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, 6, 0, 0]])
    labels[1, 4] = IGNORE_INDEX  # padding
    logps, counts = sequence_logps(logits, labels)
    table = torch.log_softmax(logits, -1)
    expected_0 = table[0, 1, 3] + table[0, 2, 4] + table[0, 3, 1]
    expected_1 = table[1, 0, 2] + table[1, 1, 6] + table[1, 2, 0]
    assert logps.tolist() == pytest.approx([expected_0.item(), expected_1.item()], abs=1e-6)
    assert counts.tolist() == [3, 3]
