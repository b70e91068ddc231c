"""The weights' dtypes (model.dtype, trainer/model/dtypes.py) on a tiny Llama stored in bf16,
as Llama, Qwen and Mistral checkpoints are shipped: transformers alone would train it in
bf16; here trained weights are fp32 unless asked otherwise, a frozen LoRA base takes the
compute dtype, and a bf16-stored and an fp32-stored copy of the same weights train alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_run_config, read_metrics, reset_accelerate
from tiny_models import llama_shape
from transformers import AutoTokenizer, LlamaForCausalLM

from trainer.cli import main
from trainer.config import build_config, load_config
from trainer.errors import UserError
from trainer.model.load import load_tokenizer
from trainer.run.setup import build_model
from trainer.tasks.registry import task_spec


@pytest.fixture(scope="session")
def llama_copies(tmp_path_factory, tiny_gpt2) -> dict[str, Path]:
    """The same 2-layer Llama weights (hidden 32) saved once in bf16, once in fp32."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    config = llama_shape(
        len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folders = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        folders[name] = tmp_path_factory.mktemp(f"llama-{name}")
        model.to(dtype).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def llama_config(tmp_path, folder: Path, data_dir, task: str = "clm", **sections) -> Path:
    models = {"clm": folder, "bert": folder}
    return make_run_config(tmp_path, task, models, data_dir, **sections)


def built(config: Path, *overrides: str) -> torch.nn.Module:
    cfg = load_config(config, list(overrides))
    spec = task_spec(cfg)
    labels = ["negative", "positive"] if spec.has_labels else None
    return build_model(cfg, spec, load_tokenizer(cfg.model, spec), labels)


def dtypes_of(model: torch.nn.Module, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable}


def test_the_checkpoint_is_stored_in_bf16(llama_copies):
    stored = LlamaForCausalLM.from_pretrained(llama_copies["bf16"])  # transformers' "auto"
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}


def test_full_fine_tuning_trains_fp32_weights_by_default(tmp_path, llama_copies, data_dir):
    model = built(llama_config(tmp_path, llama_copies["bf16"], data_dir))
    assert dtypes_of(model, trainable=True) == {torch.float32}


def test_model_dtype_bf16_trains_bf16_weights(tmp_path, llama_copies, data_dir):
    model = built(llama_config(tmp_path, llama_copies["fp32"], data_dir), "model.dtype=bf16")
    assert dtypes_of(model, trainable=True) == {torch.bfloat16}


@pytest.mark.parametrize(("precision", "frozen"), [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_lora_keeps_the_frozen_base_in_the_compute_dtype(
    tmp_path, llama_copies, data_dir, precision, frozen
):
    config = llama_config(tmp_path, llama_copies["bf16"], data_dir, "classification")
    model = built(config, "peft.method=lora", f"train.precision={precision}")
    assert dtypes_of(model, trainable=False) == {frozen}
    assert dtypes_of(model, trainable=True) == {torch.float32}  # adapters and the score head
    head = [name for name, p in model.named_parameters() if p.requires_grad and "score" in name]
    assert head, "the classification head trains in full"


@pytest.mark.slow
def test_bf16_and_fp32_copies_of_the_same_weights_train_alike(tmp_path, llama_copies, data_dir):
    curves = []
    for name, folder in llama_copies.items():
        (tmp_path / name).mkdir()
        config = llama_config(tmp_path / name, folder, data_dir, train={"max_steps": 4})
        reset_accelerate()
        assert main(["train", str(config), "train.precision=no"]) == 0
        curves.append([r["loss"] for r in read_metrics(tmp_path / name / "run") if "loss" in r])
    assert len(curves[0]) == 4
    assert curves[0] == curves[1]


def test_a_bad_dtype_and_fp16_full_fine_tuning_are_refused_naming_the_key():
    raw = {"task": "clm", "model": {"name_or_path": "m", "dtype": "fp8"}, "data": {"train": "t"}}
    with pytest.raises(UserError, match=r"model\.dtype: 'fp8' is not one of fp32, bf16"):
        build_config(raw, world_size=1)
    raw["model"]["dtype"] = "fp16"
    with pytest.raises(UserError, match=r"model\.dtype: fp16 weights can't train in full"):
        build_config(raw, world_size=1)
    raw["peft"] = {"method": "lora"}  # a frozen fp16 base is fine, computing in fp16
    with pytest.raises(UserError, match=r"model\.dtype: a fp16 LoRA base needs train.precision"):
        build_config(raw, world_size=1)
    raw["train"] = {"precision": "fp16"}
    assert build_config(raw, world_size=1).model.dtype == "fp16"
