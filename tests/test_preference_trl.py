"""Our preference task against TRL's DPOTrainer on the same tiny Llama, the same pairs and
beta: the loss, chosen and rejected rewards, log-probabilities and gradient norm agree at
the first step (policy = reference: the loss is log 2, the rewards 0) and at the second,
after one identical AdamW update, where the rewards are not 0. Full fine-tuning (a frozen
copy as the reference) and LoRA (the adapter disabled) both. TRL is a dev dependency, the
reference, never a runtime one."""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics
from test_preference import pair_rows, preference_config, train, write_jsonl

STEP = {"train.max_steps": 2, "train.lr": 1e-3, "train.scheduler": "constant",
        "train.weight_decay": 0.0, "data.max_length": 256, "preference.beta": 0.1}  # fmt: skip
PAIRS = 8


def trl_steps(model_dir, rows: list[dict], out, lora: bool) -> dict:
    """TRL's DPOTrainer, two steps of the same 8 pairs: what it logs at each."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    transformers.set_seed(0)
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=PAIRS,
        max_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        max_length=None,
        beta=0.1,
        loss_type=["sigmoid"],
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = DPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "lora"])
def test_the_first_two_steps_equal_trls(tmp_path, tiny_llama_chat, method):
    rows = pair_rows(PAIRS, 3)
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    settings = {**STEP, "train.global_batch_size": PAIRS, "train.micro_batch_size": PAIRS}
    if method == "lora":  # LoRA's B starts at zero: the first step's policy is the reference
        settings |= {"peft.method": "lora", "peft.dropout": 0.0}
    assert train(preference_config(tmp_path / "ours", tiny_llama_chat, train_file, **settings)) == 0
    ours = [r for r in read_metrics(tmp_path / "ours" / "run") if "loss" in r]
    reference = trl_steps(tiny_llama_chat, rows, tmp_path / "trl", lora=method == "lora")
    print(json.dumps({"ours": ours, "trl": reference}))
    assert len(ours) == len(reference) == 2
    assert ours[1]["rewards/chosen"] != 0.0 and ours[1]["loss"] != ours[0]["loss"]
    for mine, theirs in zip(ours, reference, strict=True):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), key
        assert mine["rewards/margin"] == pytest.approx(theirs["rewards/margins"], abs=1e-5)
        for key in ("logps/chosen", "logps/rejected"):  # sums of ~50 log-probabilities
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key
