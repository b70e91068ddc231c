"""Early stopping: patience in evaluations, a gain that counts only above
eval.early_stopping_min_delta, and no stop before eval.early_stopping_min_share of the
planned steps (frequent evaluations of a noisy metric otherwise end a run in its first
epoch)."""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics, reset_accelerate

from trainer.cli import main
from trainer.run.train import Best


def updates(metric: str, values: list[float], min_delta: float) -> tuple[list[bool], Best]:
    best = Best(metric)
    found = [best.update({metric: v}, step, min_delta) for step, v in enumerate(values, 1)]
    return found, best


def test_a_gain_below_min_delta_is_the_best_model_but_keeps_the_patience_running():
    found, best = updates("f1", [0.50, 0.505, 0.52, 0.60], min_delta=0.05)
    assert found == [True, True, True, True]  # each is the best model so far ...
    assert best.stale == 0  # ... but only 0.52 -> 0.60 was a gain above 0.05
    found, best = updates("f1", [0.50, 0.505, 0.52], min_delta=0.05)
    assert best.stale == 2 and best.step == 3


def test_lower_is_better_and_nan_never_improve():
    found, best = updates("loss", [1.0, 0.9, float("nan"), 0.95, 0.89], min_delta=0.0)
    assert found == [True, True, False, False, True]
    assert (best.value, best.step, best.stale) == (0.89, 5, 0)
    _, best = updates("loss", [1.0, 0.99], min_delta=0.05)
    assert (best.value, best.stale) == (0.99, 1)


@pytest.mark.parametrize(("min_share", "stopped_at"), [(0.0, 2), (0.5, 5), (1.0, 10)])
def test_no_early_stop_before_the_min_share_of_the_planned_steps(
    run_config, capsys, min_share, stopped_at
):
    """lr 1e-12: the validation loss moves by far less than min_delta, so every evaluation
    after the first is stale; patience 1 then stops at the first step the share allows."""
    config = run_config(
        "classification",
        train={"max_steps": 10, "lr": 1e-12},
        eval={
            "every_steps": 1,
            "metric": "loss",
            "early_stopping_patience": 1,
            "early_stopping_min_delta": 1e-3,
            "early_stopping_min_share": min_share,
        },
    )
    reset_accelerate()
    assert main(["train", str(config)]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out.strip().splitlines()[-1])
    assert results["steps"] == stopped_at and results["best_step"] == 1
    evaluated = [r["step"] for r in read_metrics(config.parent / "run") if "eval_loss" in r]
    assert evaluated == list(range(1, stopped_at + 1))
    if stopped_at < 10:
        stale = stopped_at - 1
        assert (
            f"early stopping at step {stopped_at}: {stale} evaluation(s) without a gain"
            in captured.err
        )
        assert "the best is step 1" in captured.err
