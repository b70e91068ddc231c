"""The run config's schema: its sections as dataclasses, each field carrying its default and
its help (`trainer keys`, the config reference), and the allowed values of choice keys.

Checking a loaded config is trainer/config.py's job; this module only says what the keys are.
It imports nothing heavy, so that a bad config is rejected before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.tasks.registry import TASKS, task_spec

SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
PEFT_METHODS = ("none", "lora", "qlora")
WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "auto")
ON_NONFINITE = ("skip", "stop")
CLASS_WEIGHTS = ("none", "auto")
TRUNCATIONS = ("keep_end", "drop")
PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo")
AUGMENT_OPERATIONS = ("deletion", "swap", "insertion", "synonym_replacement")


def _field(default: Any, help: str) -> Any:
    """A dataclass field carrying its documentation (mutable defaults are copied)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name_or_path: str = _field("", "Hub id or local folder of the model (and its tokenizer).")
    revision: str | None = _field(
        None, "Hub branch, tag or commit of the model, its config and its own tokenizer."
    )
    tokenizer: str | None = _field(
        None, "Tokenizer folder or hub id when not the model's own (trained or extended)."
    )
    from_scratch: bool = _field(False, "Random weights from the model's config, not its weights.")
    config_overrides: dict = _field({}, "Applied to the model config, e.g. {dropout: 0.0}.")
    attn_implementation: str | None = _field(
        None, "eager | sdpa | flash_attention_2 | ...; unset: transformers' default (sdpa)."
    )
    trust_remote_code: bool = _field(False, "Allow model code from the hub (off: safer).")
    dtype: str | None = _field(
        None,
        "fp32 | bf16 | fp16 | auto (the checkpoint's). Unset: fp32 when training in full, else "
        "the frozen base in train.precision's dtype (adapters, heads: fp32). bf16 in full keeps "
        "no fp32 master copy: updates below a weight's rounding step are lost.",
    )


@dataclass
class AugmentConfig:
    copies: int = _field(0, "Augmented variants of each training row per epoch; 0: off.")
    deletion: float = _field(0.1, "EDA random deletion: probability of dropping each word.")
    swap: float = _field(0.1, "EDA random swap: alpha; max(1, round(alpha x words)) swaps.")
    insertion: float = _field(0.1, "EDA random insertion of synonyms: alpha, as for swap.")
    synonym_replacement: float = _field(0.1, "EDA synonym replacement: alpha, as for swap.")
    synonyms: str | None = _field(None, "Synonym table: TSV, `word<TAB>syn1,syn2` per line.")


@dataclass
class DataConfig:
    train: str | list | None = _field(
        None,
        "File (.csv .tsv .json .jsonl .parquet .txt), glob (streaming) or hub dataset; or a "
        "list of them, each optionally {path: P, weight: W}, mixed by weight.",
    )
    validation: str | None = _field(None, "Validation file or hub dataset; see validation_split.")
    validation_split: float = _field(0.0, "Seeded fraction of train held out when no validation.")
    hub_config: str | None = _field(None, "Subset name for hub datasets (e.g. sst2 of glue).")
    text_column: str = _field("text", "Column holding the text.")
    label_column: str = _field("label", "Column holding the class (int or string).")
    tokens_column: str = _field("tokens", "token-classification: column of word lists.")
    tags_column: str = _field("tags", "token-classification: column of tag lists.")
    tag_scheme: str | None = _field(
        None, "token-classification: io | iob1 | iob2 (bio) | bioes (iobes); unset: from the tags."
    )
    prompt_column: str = _field("prompt", "sft: column of prompts (text or chat messages).")
    completion_column: str = _field("completion", "sft: column of the prompts' answers.")
    messages_column: str = _field("messages", "sft: column of chat turns [{role, content}].")
    chosen_column: str = _field("chosen", "preference: column of the preferred answers.")
    rejected_column: str = _field("rejected", "preference: column of the dispreferred answers.")
    chat_template: str | None = _field(None, "sft: a Jinja file, chatml or llama-3; unset: own.")
    train_on_prompt: bool = _field(False, "sft: loss on every token, not the answers only.")
    last_turn_only: bool = _field(False, "sft: loss on the last assistant turn only.")
    truncation: str = _field("keep_end", "sft, a row over max_length: keep_end | drop.")
    packing: bool = _field(
        False, "sft: examples (preference: sequences) packed into max_length rows, attention apart."
    )
    max_length: int = _field(128, "Tokens per example; MLM/CLM pack texts into blocks this long.")
    streaming: bool = _field(False, "MLM/CLM/sft: read, tokenize and pack train on the fly.")
    shuffle_buffer: int = _field(1000, "Streaming: blocks (sft: rows) in the shuffle buffer.")
    cache_dir: str | None = _field(
        "auto",
        "Tokenized-data cache shared by ranks and nodes; auto: $HF_HOME/trainer/data, else "
        "$XDG_CACHE_HOME/trainer/data, else ~/.cache/trainer/data; null: off.",
    )
    group_by_length: bool = _field(False, "Fine-tuning: batch texts of similar length.")
    isolate_documents: bool = _field(False, "MLM/CLM: no attention across packed documents.")

    class_weights: str | dict = _field(
        "none", "Loss weight per class: none | auto (inverse frequency) | {label: weight}."
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        # Labels are read as strings (data/read.py); YAML reads `0: 2.0` with an integer key.
        if isinstance(self.class_weights, dict):
            self.class_weights = {str(k): v for k, v in self.class_weights.items()}


@dataclass
class MlmConfig:
    mask_probability: float = _field(0.15, "Share of tokens selected for prediction.")
    mask_token_fraction: float = _field(0.8, "Of the selected, share replaced by the mask token.")
    random_token_fraction: float = _field(0.1, "Of the selected, share replaced by a random token.")
    whole_word_masking: bool = _field(False, "Select whole words rather than single sub-tokens.")
    next_sentence: bool = _field(
        False, "Sentence pairs and a next-sentence head too (BERT pretraining: MLM + NSP)."
    )


@dataclass
class PreferenceConfig:
    loss: str = _field("dpo", "dpo | ipo | simpo | orpo (simpo and orpo need no reference).")
    beta: float = _field(0.1, "DPO/IPO: strength of the pull to the reference; SimPO: scale.")
    label_smoothing: float = _field(0.0, "dpo: share of pairs taken as mislabelled, [0, 0.5).")
    simpo_gamma: float = _field(0.5, "simpo: target reward margin.")
    orpo_lambda: float = _field(0.1, "orpo: weight of the odds-ratio term next to the SFT loss.")
    sft_weight: float = _field(
        0.0,
        "dpo/ipo/simpo: weight of the chosen answer's NLL per token added to each pair's "
        "loss (RPO; TRL's loss_type [sigmoid, sft]), which keeps the chosen answers likely.",
    )
    precompute_reference: bool = _field(
        False,
        "dpo/ipo in full fine-tuning: score every pair with the initial model once before "
        "training (kept in the data cache), so that training holds one model (no frozen "
        "copy); the way to dpo/ipo in full under ZeRO-3/FSDP.",
    )


@dataclass
class PeftConfig:
    method: str = _field("none", "none (full fine-tuning) | lora | qlora (LoRA on a 4-bit base).")
    r: int = _field(8, "LoRA rank.")
    alpha: float = _field(16.0, "LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = _field(0.05, "Dropout on the LoRA branch.")
    target_modules: list | str | None = _field(
        None, "Modules to adapt: a list, 'all-linear', or null for the architecture default."
    )
    options: dict = _field({}, "More peft.LoraConfig fields, e.g. {use_rslora: true}.")


@dataclass
class TrainConfig:
    epochs: int = _field(3, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _field(0, "Optimizer steps to run; 0 means use epochs.")
    global_batch_size: int = _field(32, "Examples per optimizer step, over all processes.")
    micro_batch_size: int = _field(8, "Most examples per forward pass on one process.")
    lr: float = _field(5e-5, "Peak learning rate.")
    weight_decay: float = _field(0.01, "AdamW weight decay (never on biases and norm weights).")
    warmup_ratio: float = _field(0.1, "Share of the steps spent warming the LR up from 0.")
    scheduler: str = _field("linear", "LR decay after warmup: linear | cosine | constant.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm; 0 turns clipping off.")
    precision: str = _field("no", "Mixed precision: no | bf16 | fp16 (fp16 needs CUDA).")
    gradient_checkpointing: bool = _field(False, "Recompute activations to save memory.")
    compile: bool = _field(False, "torch.compile the model (inductor); costs minutes of compiling.")
    layerwise_lr_decay: float = _field(1.0, "LR factor per layer below the top (1.0: off).")
    head_warmup_ratio: float | None = _field(
        None,
        "Share of the steps in which only the parameters the checkpoint lacked (a new head) "
        "learn, the rest at LR 0; unset: the task's default (0 when nothing is new).",
    )
    head_lr: float | None = _field(None, "Peak LR of the newly initialised parameters; unset: lr.")
    seed: int = _field(42, "Seed for weights init, data order, masking and splits.")
    resume: str = _field("auto", "auto (newest complete checkpoint) | never | a checkpoint path.")
    resume_trusted: bool = _field(False, "Allow train.resume=PATH outside output_dir (pickles).")
    max_time: str | int | None = _field(
        None,
        "Wall time as SLURM writes it (MM, HH:MM:SS, D-HH, ...); save and exit before it.",
    )
    on_nonfinite: str = _field("skip", "Non-finite loss/grad norm: skip the step | stop.")
    max_nonfinite_in_a_row: int = _field(5, "With skip: stop after this many skipped in a row.")
    collective_timeout: float = _field(
        600.0,
        "Seconds a collective may wait for every process before the job fails (torch: 1800).",
    )


@dataclass
class EvalConfig:
    every_steps: int = _field(0, "Evaluate every N optimizer steps; 0: at each epoch end.")
    early_stopping_patience: int = _field(0, "Stop after N evaluations without improvement.")
    early_stopping_min_delta: float = _field(0.0, "Gain in eval.metric that counts as one.")
    early_stopping_min_share: float = _field(0.5, "No early stop before this share of steps.")
    metric: str | None = _field(None, "Metric that picks the best model (task default if unset).")
    batch_size: int = _field(32, "Examples per evaluation forward pass on one process.")
    generate: int = _field(
        0, "sft/clm: answer the first N validation prompts at each evaluation (samples.jsonl)."
    )
    max_new_tokens: int = _field(64, "eval.generate: most tokens generated per prompt.")


@dataclass
class LogConfig:
    every_steps: int = _field(10, "Write a metrics.jsonl line every N optimizer steps.")
    trackers: list = _field(
        ["tensorboard"], "Experiment trackers: tensorboard, wandb, mlflow, ... (accelerate's); []."
    )
    tracker_options: dict = _field({}, "Init arguments per tracker, e.g. {wandb: {entity: E}}.")
    project: str = _field("steadytrain", "Project (W&B) or experiment (MLflow) to log to.")


@dataclass
class CheckpointConfig:
    every_steps: int = _field(0, "Save the full training state every N steps; 0: off.")
    every_minutes: float = _field(30.0, "Also save when this many minutes passed; 0: off.")
    keep_last: int = _field(2, "Complete checkpoints kept (the best one is kept as well).")
    at_epoch_end: bool = _field(True, "Also save at each epoch's end but the last (once a step).")


@dataclass
class RunConfig:
    task: str = _field("", " | ".join(TASKS) + ".")
    output_dir: str = _field("runs/run", "Run directory: config, metrics, checkpoints, final/.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def eval_metric(self) -> str:
        """The metric that selects the best model: the configured one or the task default."""
        return self.eval.metric or task_spec(self).metrics[0]

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per process per optimizer step (validated to divide exactly)."""
        return self.train.global_batch_size // (self.train.micro_batch_size * world_size)
