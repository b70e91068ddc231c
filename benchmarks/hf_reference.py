"""The reference side of every comparison: a `comparison.Job` run with plain
`transformers.Trainer` (+ `peft` for LoRA and QLoRA), written the way the Hugging Face
examples (run_glue, run_mlm, run_clm) and peft's guides do it.

`run_job` starts it in a fresh process (the worker "hf", which calls `train`), so that its
wall time includes start-up and imports and its peak RSS is its own, as for our engine.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import run_worker
from benchmarks.comparison import LABELS, LORA, Job, side

# The modules QLoRA leaves unquantized. `.*pooler`, not `pooler`: transformers 5 matches a
# plain name as a prefix or a suffix of the module path, so "pooler" would not skip
# `bert.pooler.dense` (a regex with a module boundary does); our engine skips the same.
NOT_QUANTIZED = ["classifier", ".*pooler"]
TIMING_KEYS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")


def run_job(job: Job, model: str, work_dir: Path) -> dict[str, Any]:
    """The reference side of a comparison, in a fresh process; one side's numbers."""
    name = f"hf-{job.name}"
    spec = {"job": asdict(job), "model": model, "out_dir": str(work_dir / name)}
    measured, found = run_worker("hf", spec, work_dir / f"{name}.log")
    return side(measured, **found)


# --- the worker process --------------------------------------------------------------------


def train(spec: dict) -> dict[str, Any]:
    """Build, train, evaluate (and for LoRA/QLoRA save) with Trainer; what `side` needs."""
    import transformers
    from transformers import AutoTokenizer, Trainer

    job, model, out_dir = Job(**spec["job"]), spec["model"], Path(spec["out_dir"])
    transformers.logging.set_verbosity_error()
    transformers.set_seed(job.seed)  # the new head's and the adapter's init
    tokenizer = AutoTokenizer.from_pretrained(model)
    data, collator = (classification_data if job.task == "classification" else packed_data)(
        job, tokenizer
    )
    net = build_model(job, model)
    trainer = Trainer(
        model=net,
        args=training_arguments(job, out_dir),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        compute_metrics=classification_metrics if job.task == "classification" else None,
    )
    marks = step_clock()
    trainer.add_callback(marks)
    output = trainer.train()
    evaluation = trainer.evaluate()
    final_dir = None
    if job.peft != "none" or job.keep_final:  # LoRA: its size is compared; or to be scored
        final_dir = str(out_dir / "final")
        trainer.save_model(final_dir)  # the adapter and modules_to_save
        tokenizer.save_pretrained(final_dir)  # as our engine's final/ has it
    metrics = {k.removeprefix("eval_"): v for k, v in evaluation.items() if k not in TIMING_KEYS}
    if job.task != "classification":
        metrics["perplexity"] = math.exp(metrics["loss"])
    return {
        **trained_amounts(job, trainer.train_dataset, output.global_step),
        "train_s": output.metrics["train_runtime"],
        "step_times": [b - a for a, b in itertools.pairwise(marks.times)],
        "metrics": metrics,
        "final_dir": final_dir,
        **parameter_counts(net, job),
    }


def trained_amounts(job: Job, dataset, steps: int) -> dict[str, int]:
    """Steps, samples and useful tokens trained on. Trainer keeps each epoch's partial last
    batch; tokens are the train set's (no padding) times the epochs it covered."""
    rows = len(dataset)
    epochs, rest = divmod(steps, math.ceil(rows / job.batch_size))
    samples = epochs * rows + rest * job.batch_size
    per_epoch = sum(len(ids) for ids in dataset["input_ids"])
    return {"steps": steps, "samples": samples, "tokens": round(per_epoch * samples / rows)}


def parameter_counts(net, job: Job) -> dict[str, int]:
    """Parameters as our run_summary.json counts them: with peft, its own count, which
    unpacks 4-bit tensors (torch's numel() counts 2 packed weights as 1)."""
    torch_count = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = net.get_nb_trainable_parameters()[1] if job.peft != "none" else torch_count
    return {"parameters": total, "trainable_parameters": trainable, "torch_parameters": torch_count}


def step_clock():
    """A callback that notes perf_counter when training starts and after each step."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.times = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    return StepClock()


def counted_training(trainer, count) -> dict:
    """Train a TRL trainer, noting per step the time since the start and `count(batch)` of
    the batch its collator made (the collator is wrapped before `train()` builds the
    dataloader); the windows, as our engine logs them, and the logged losses."""
    counts: list[dict] = []
    collate = trainer.data_collator

    def counted(examples):
        batch = collate(examples)
        counts.append(count(batch))
        return batch

    trainer.data_collator = counted
    clock = step_clock()
    trainer.add_callback(clock)
    trainer.train()
    windows = [
        {"step": i + 1, "elapsed_s": clock.times[i + 1] - clock.times[0], **counts[i]}
        for i in range(len(clock.times) - 1)
    ]
    return {
        "windows": windows,
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
    }


def training_arguments(job: Job, out_dir: Path):
    """TrainingArguments with the job's settings; one evaluation, after training."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=job.epochs,
        max_steps=job.max_steps or -1,
        per_device_train_batch_size=job.batch_size,
        per_device_eval_batch_size=job.eval_batch_size,
        learning_rate=job.lr,
        warmup_steps=job.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=job.weight_decay,
        max_grad_norm=job.max_grad_norm,
        lr_scheduler_type="linear",
        seed=job.seed,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=job.log_every,
        label_names=["labels"],  # a peft model's forward hides the name from Trainer
        report_to="none",
        disable_tqdm=True,
    )


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and binary F1 of class 1 ("positive"), as our engine reports them."""
    from sklearn.metrics import accuracy_score, f1_score

    predictions = eval_pred.predictions
    if isinstance(predictions, tuple):  # some models return more than the logits
        predictions = predictions[0]
    predictions, labels = predictions.argmax(axis=-1), eval_pred.label_ids
    return {"accuracy": accuracy_score(labels, predictions), "f1": f1_score(labels, predictions)}


# --- data and models -----------------------------------------------------------------------


def classification_data(job: Job, tokenizer):
    """The csv splits tokenized (truncated, unpadded), padded per batch by the collator."""
    from datasets import load_dataset
    from transformers import DataCollatorWithPadding

    label_ids = {name: i for i, name in enumerate(LABELS)}

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], truncation=True, max_length=job.max_length)
        return {**encoded, "labels": [label_ids[label] for label in batch["label"]]}

    raw = load_dataset("csv", data_files={"train": job.train, "validation": job.validation})
    data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    return data, DataCollatorWithPadding(tokenizer)


def packed_data(job: Job, tokenizer):
    """Text files, blank lines skipped (as our reader does), concatenated and cut into full
    blocks of max_length as in run_mlm / run_clm. CLM documents end with the end-of-text
    token, as our engine joins them, and every position of a block is a target; MLM keeps
    each one's [CLS] ... [SEP]."""
    from datasets import load_dataset
    from transformers import DataCollatorForLanguageModeling, default_data_collator

    def encode(batch: dict) -> dict:
        if job.task == "mlm":
            return tokenizer(batch["text"], return_special_tokens_mask=True)
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[*doc, tokenizer.eos_token_id] for doc in ids]}

    def blocks(examples: dict) -> dict:
        joined = {k: list(itertools.chain(*examples[k])) for k in examples}
        usable = len(joined["input_ids"]) // job.max_length * job.max_length
        starts = range(0, usable, job.max_length)
        return {k: [t[i : i + job.max_length] for i in starts] for k, t in joined.items()}

    def with_labels(examples: dict) -> dict:  # run_clm: every position is a target
        return {**examples, "labels": [list(ids) for ids in examples["input_ids"]]}

    raw = load_dataset("text", data_files={"train": job.train, "validation": job.validation})
    raw = raw.filter(lambda row: bool(row["text"].strip()))
    data = raw.map(encode, batched=True, remove_columns=["text"]).map(blocks, batched=True)
    if job.task == "mlm":
        return data, DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    # run_clm's default_data_collator: it needs no padding token (a BPE tokenizer trained
    # from scratch has none) and, unlike DataCollatorForLanguageModeling, never drops the
    # targets of a padding token that is also the end-of-text one (GPT-2's usual pad = eos)
    return data.map(with_labels, batched=True), default_data_collator


def build_model(job: Job, model: str):
    """The job's model; for LoRA wrapped with the adapter, for QLoRA a 4-bit NF4 base
    (double quantization, fp32 compute) prepared by prepare_model_for_kbit_training
    without gradient checkpointing (our engine only turns it on when asked)."""
    import torch
    import transformers

    if job.task != "classification":
        auto = transformers.AutoModelForMaskedLM if job.task == "mlm" else None
        return (auto or transformers.AutoModelForCausalLM).from_pretrained(model)
    kwargs: dict[str, Any] = {}
    if job.peft == "qlora":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=NOT_QUANTIZED,
        )
        device = 0 if torch.cuda.is_available() else "cpu"
        kwargs = {"quantization_config": quantization, "device_map": {"": device}}
    net = transformers.AutoModelForSequenceClassification.from_pretrained(
        model,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        dtype=torch.float32,
        **kwargs,
    )
    return net if job.peft == "none" else with_lora(net, job.peft == "qlora")


def with_lora(net, quantized: bool):
    """The model wrapped with peft's LoRA adapter (the classifier trained in full)."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=LORA.dropout,
        target_modules=list(LORA.target_modules),
        modules_to_save=list(LORA.modules_to_save),
    )
    return get_peft_model(net, config)
