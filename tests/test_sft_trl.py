"""Our sft task against TRL's SFTTrainer on the same tiny Llama, the same rows and settings:
the first step's loss and gradient norm agree, so both train on the same tokens (TRL is a
dev dependency, the reference, never a runtime one)."""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics
from test_sft import reverse_rows, sft_config, train, write_jsonl

STEP = {"train.max_steps": 1, "train.lr": 1e-3, "train.scheduler": "constant",
        "train.weight_decay": 0.0, "data.max_length": 256}  # fmt: skip


def trl_first_step(model_dir, rows: list[dict], out, **options) -> dict:
    """TRL's SFTTrainer, one step of 8 rows: its logged loss and gradient norm."""
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    transformers.set_seed(0)
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=1,
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
        **options,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    return next(r for r in trainer.state.log_history if "loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["messages", "pairs"])
def test_the_first_step_equals_trls(tmp_path, tiny_llama_chat, shape):
    rows = reverse_rows(8, 5, shape)
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    template = {"data.chat_template": "chatml"} if shape == "messages" else {}
    assert (
        train(sft_config(tmp_path / "ours", tiny_llama_chat, train_file, **STEP, **template)) == 0
    )
    ours = next(r for r in read_metrics(tmp_path / "ours" / "run") if "loss" in r)

    if shape == "messages":  # the template with generation markers, as TRL requires for it
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours" / "run" / "final")
        model_dir = tmp_path / "with-template"
        tokenizer.save_pretrained(model_dir)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(tiny_llama_chat).save_pretrained(model_dir)
        reference = trl_first_step(model_dir, rows, tmp_path / "trl", assistant_only_loss=True)
    else:
        reference = trl_first_step(tiny_llama_chat, rows, tmp_path / "trl")
    print(json.dumps({"ours": ours, "trl": reference}))
    assert ours["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], abs=1e-5)
