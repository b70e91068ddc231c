"""Loading the tokenizer and the model with the head the task needs.

Loading errors that the user can fix (a missing folder, a hub id that cannot be reached, a
config override the model does not have) become one-line `UserError`s naming the key.
The tokenizer is the model's own unless `model.tokenizer` names another (one trained with
`trainer tokenizer train`, or extended with `trainer tokenizer extend`); the embeddings grow
to fit it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from trainer.config import ModelConfig, PeftConfig
from trainer.errors import UserError
from trainer.model import adapters, vocabulary

AUTO_CLASSES = {
    "mlm": "AutoModelForMaskedLM",
    "clm": "AutoModelForCausalLM",
    "classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "pretraining": "AutoModelForPreTraining",  # mlm.next_sentence: MLM + NSP heads
}
# Architecture name endings, to tell which task a saved model was trained for.
HEAD_SUFFIXES = {
    "ForMaskedLM": "mlm",
    "ForPreTraining": "mlm",
    "ForCausalLM": "clm",
    "LMHeadModel": "clm",
    "ForSequenceClassification": "classification",
    "ForTokenClassification": "token-classification",
}


def _source(cfg: ModelConfig) -> str:
    """The folder or hub id to load; a path-like name must exist locally."""
    name = cfg.name_or_path
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path: {name} has no config.json (not a model folder)")
        return str(path.resolve())  # absolute: an adapter saved from it must find it again
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise UserError(f"model.name_or_path: folder not found: {name}")
    return name


def _tokenizer_source(cfg: ModelConfig) -> tuple[str, str]:
    """The config key and the folder or hub id of the tokenizer to load."""
    if not cfg.tokenizer:
        return "model.name_or_path", _source(cfg)
    path = Path(cfg.tokenizer).expanduser()
    if path.exists():
        return "model.tokenizer", str(path.resolve())
    if cfg.tokenizer.startswith(("/", ".", "~")) or cfg.tokenizer.count("/") > 1:
        raise UserError(f"model.tokenizer: folder not found: {cfg.tokenizer}")
    return "model.tokenizer", cfg.tokenizer


def _loading(what: str, name: str, load, key: str = "model.name_or_path"):
    try:
        return load()
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}: could not load the {what} of '{name}': {first}") from None


def load_tokenizer(cfg: ModelConfig, task: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer (or `model.tokenizer`), with a pad token (EOS for GPT-style
    models that lack one)."""
    key, source = _tokenizer_source(cfg)
    tokenizer = _loading(
        "tokenizer",
        cfg.tokenizer or cfg.name_or_path,
        lambda: AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code),
        key,
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "mlm" and tokenizer.mask_token is None:
        raise UserError("model.name_or_path: the tokenizer has no mask token, which MLM needs")
    if tokenizer.pad_token is None and task in ("classification", "token-classification"):
        raise UserError("model.name_or_path: the tokenizer has neither a pad nor an EOS token")
    return tokenizer


def load_model_config(cfg: ModelConfig, label_names: list[str] | None) -> PretrainedConfig:
    """The model config with label names and the user's overrides applied."""
    source = _source(cfg)
    config = _loading(
        "config",
        cfg.name_or_path,
        lambda: AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code),
    )
    unknown = [key for key in cfg.config_overrides if not hasattr(config, key)]
    if unknown:
        raise UserError(
            f"model.config_overrides: {type(config).__name__} has no field "
            + ", ".join(f"'{key}'" for key in unknown)
        )
    for key, value in cfg.config_overrides.items():
        setattr(config, key, value)
    if label_names is not None:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    return config


def check_document_isolation(model: torch.nn.Module) -> None:
    """data.isolate_documents passes a 4-D attention mask and per-document position ids:
    refuse a model whose forward takes no position ids, or whose attention kernel
    (flash attention) takes no 4-D mask, rather than train it with the mask ignored."""
    forward = inspect.signature(model.forward).parameters
    if "position_ids" not in forward:
        raise UserError(
            f"data.isolate_documents: {type(model).__name__} takes no position_ids; "
            "turn it off for this model"
        )
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention not in ("eager", "sdpa"):
        raise UserError(
            f"data.isolate_documents: needs eager or sdpa attention, the model uses {attention}"
        )


def saved_label_names(config: PretrainedConfig) -> list[str] | None:
    """Label names of a fine-tuned head, or None for a base model's placeholder names."""
    names = [config.id2label[i] for i in sorted(config.id2label)]
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names


def load_model(
    cfg: ModelConfig,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None = None,
    seed: int = 0,
    quantization: BitsAndBytesConfig | None = None,
) -> torch.nn.Module:
    """The model with the task's head: pretrained weights, or random ones (`from_scratch`),
    optionally quantized on load (QLoRA). A head whose size differs from the saved one
    (new labels) is re-initialised."""
    config = load_model_config(cfg, label_names)
    if cfg.from_scratch and cfg.tokenizer:
        _fit_to_tokenizer(config, tokenizer)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if task == "pretraining":
        _check_next_sentence_head(config)
    auto_class = getattr(transformers, AUTO_CLASSES[task])
    torch.manual_seed(seed)  # the same random head / random init on every process
    attention = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.from_scratch:
        model = auto_class.from_config(config, trust_remote_code=cfg.trust_remote_code, **attention)
    else:
        model = _loading(
            "weights",
            cfg.name_or_path,
            lambda: auto_class.from_pretrained(
                _source(cfg),
                config=config,
                trust_remote_code=cfg.trust_remote_code,
                ignore_mismatched_sizes=label_names is not None,
                **_quantized_loading(quantization),
                **attention,
            ),
        )
        if quantization is not None:
            adapters.keep_4bit_layout(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        pieces = vocabulary.added_token_pieces(cfg.tokenizer) if cfg.tokenizer else {}
        if pieces:
            vocabulary.grow_embeddings(model, len(tokenizer), pieces)
        else:
            model.resize_token_embeddings(len(tokenizer))
    return model


def _fit_to_tokenizer(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """A model built from scratch for its own tokenizer: one embedding row per token, and
    the special-token ids of that tokenizer rather than those of the config's model."""
    config.vocab_size = len(tokenizer)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(config, name) and getattr(tokenizer, name) is not None:
            setattr(config, name, getattr(tokenizer, name))


def _check_next_sentence_head(config: PretrainedConfig) -> None:
    """mlm.next_sentence needs a pretraining class with an NSP head (BERT-style); others
    (RoBERTa, GPT-2, ELECTRA...) would fail later or silently train no NSP."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_PRETRAINING_MAPPING_NAMES

    name = MODEL_FOR_PRETRAINING_MAPPING_NAMES.get(config.model_type)
    model_class = getattr(transformers, name, None) if name else None
    if (
        model_class is None
        or "next_sentence_label" not in inspect.signature(model_class.forward).parameters
    ):
        raise UserError(
            f"mlm.next_sentence: {config.model_type} models have no next-sentence head "
            f"(AutoModelForPreTraining gives {name or 'no class'}); use a BERT-style model"
        )


def _quantized_loading(quantization: BitsAndBytesConfig | None) -> dict:
    if quantization is None:
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    index = PartialState().local_process_index if device == "cuda" else None
    return {
        "quantization_config": quantization,
        "device_map": {"": index if index is not None else device},
        "dtype": quantization.bnb_4bit_compute_dtype,
    }


def load_trained(
    folder: str,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    peft: PeftConfig,
    precision: str,
    seed: int,
    base: str | None = None,
    adapter_name: str = "default",
) -> torch.nn.Module:
    """A model saved by a run: a full model, or an adapter folder whose base (`base`, or the
    one recorded in the folder) is loaded, quantized again for QLoRA, and given the adapter
    and the heads saved with it. Base weights missing from the base checkpoint (e.g. the
    pooler of an MLM-only BERT) are frozen under LoRA and not saved: `seed`, the run's,
    draws them again exactly as in training."""
    if not adapters.is_adapter_folder(folder):
        return load_model(ModelConfig(name_or_path=folder), task, tokenizer)
    label_names = saved_label_names(load_model_config(ModelConfig(name_or_path=folder), None))
    base_cfg = ModelConfig(name_or_path=base or adapters.base_of(folder))
    quantization = adapters.quantization_config(precision) if peft.method == "qlora" else None
    model = load_model(base_cfg, task, tokenizer, label_names, seed, quantization)
    return adapters.load_adapter(model, folder, adapter_name)


def task_of_saved_model(path: str) -> str | None:
    """Which task a saved model's head serves, from its config's architectures."""
    config = AutoConfig.from_pretrained(path)
    for architecture in config.architectures or []:
        for suffix, task in HEAD_SUFFIXES.items():
            if architecture.endswith(suffix):
                return task
    return None
