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
from transformers.integrations import is_deepspeed_zero3_enabled

from trainer.config import ModelConfig
from trainer.devices import accelerator_type
from trainer.errors import UserError
from trainer.logs import get_logger
from trainer.model import adapters, carried, dtypes, hub, vocabulary
from trainer.tasks.spec import TaskSpec

logger = get_logger(__name__)


def _source(cfg: ModelConfig) -> str:
    """The folder or hub id to load; a path-like name must exist locally."""
    name = cfg.name_or_path
    path = Path(name).expanduser()
    if path.is_file():
        raise UserError(f"model.name_or_path: {name} is a file; name the model folder")
    if path.exists():
        # an adapter folder (no config.json of its own) is read for its tokenizer
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise UserError(f"model.name_or_path: {name} has no config.json (not a model folder)")
        return str(path.resolve())  # absolute: an adapter saved from it must find it again
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise UserError(f"model.name_or_path: folder not found: {name}")
    hub.unreachable()  # a hub id: fail fast, not after minutes of retries
    return name


def _revision(cfg: ModelConfig) -> dict:
    """`revision=` for a from_pretrained of model.name_or_path (none: the hub's default)."""
    return {"revision": cfg.revision} if cfg.revision else {}


def _tokenizer_source(cfg: ModelConfig) -> tuple[str, str]:
    """The config key and the folder or hub id of the tokenizer to load."""
    if not cfg.tokenizer:
        return "model.name_or_path", _source(cfg)
    path = Path(cfg.tokenizer).expanduser()
    if path.is_file():
        raise UserError(f"model.tokenizer: {cfg.tokenizer} is a file; name the tokenizer folder")
    if path.exists():
        return "model.tokenizer", str(path.resolve())
    if cfg.tokenizer.startswith(("/", ".", "~")) or cfg.tokenizer.count("/") > 1:
        raise UserError(f"model.tokenizer: folder not found: {cfg.tokenizer}")
    hub.unreachable()
    return "model.tokenizer", cfg.tokenizer


def _loading(what: str, name: str, load, key: str = "model.name_or_path"):
    try:
        return load()
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not Path(name).expanduser().exists():  # a hub id: offline, unknown, or private
            if reason := hub.unreachable():
                raise UserError(
                    f"{key}: '{name}' is neither a local folder nor in the hub cache, and "
                    f"{reason} (HF_HUB_OFFLINE=1 skips the hub; on a node without internet, "
                    "download the model first and name its folder)"
                ) from None
            raise UserError(
                f"{key}: '{name}' is neither a local folder nor reachable on the hub ({first})"
            ) from None
        raise UserError(f"{key}: could not load the {what} of '{name}': {first}") from None


def load_tokenizer(cfg: ModelConfig, spec: TaskSpec) -> PreTrainedTokenizerBase:
    """The model's tokenizer (or `model.tokenizer`), with a pad token (EOS for GPT-style
    models that lack one) and the special tokens the task needs."""
    key, source = _tokenizer_source(cfg)
    revision = {} if cfg.tokenizer else _revision(cfg)  # model.revision is the model repo's
    tokenizer = _loading(
        "tokenizer",
        cfg.tokenizer or cfg.name_or_path,
        lambda: AutoTokenizer.from_pretrained(
            source, trust_remote_code=cfg.trust_remote_code, **revision
        ),
        key,
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    for token in spec.required_tokens:
        if getattr(tokenizer, token) is None:
            what = token.replace("_", " ")
            raise UserError(f"{key}: the tokenizer has no {what}, which {spec.name} needs")
    return tokenizer


def load_model_config(cfg: ModelConfig, label_names: list[str] | None) -> PretrainedConfig:
    """The model config with label names and the user's overrides applied."""
    source = _source(cfg)
    config = _loading(
        "config",
        cfg.name_or_path,
        lambda: AutoConfig.from_pretrained(
            source, trust_remote_code=cfg.trust_remote_code, **_revision(cfg)
        ),
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


# position ids start after the padding index, so that two positions fewer are usable
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer")


def position_limit(config: PretrainedConfig) -> int | None:
    """The longest sequence a model with learned position embeddings can take (BERT's
    max_position_embeddings, GPT-2's n_positions); None for rotary ones, which extrapolate,
    and for DeBERTa-v2/v3 without absolute positions (`position_biased_input: false`)."""
    if any(hasattr(config, name) for name in ("rope_parameters", "rope_theta", "rotary_dim")):
        return None
    if getattr(config, "position_biased_input", True) is False:
        return None
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0)
    if limit and config.model_type in PADDING_OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1
    return limit or None


def check_max_length(cfg: ModelConfig, max_length: int) -> None:
    """Refuse data.max_length beyond the model's positions before anything is tokenized: a
    longer sequence indexes past the position embeddings, an error at the first batch that
    is that long (step 1 for packed blocks, maybe mid-epoch for fine-tuning texts)."""
    limit = position_limit(load_model_config(cfg, None))
    if limit is not None and max_length > limit:
        raise UserError(
            f"data.max_length: {max_length} is more than the {limit} positions of "
            f"{cfg.name_or_path}; lower it to {limit} or less"
        )


def check_document_isolation(model: torch.nn.Module) -> None:
    """data.isolate_documents and data.packing pass per-document position ids, with a 4-D
    attention mask for eager and SDPA attention, or none for flash attention, which
    transformers then runs on its variable-length path (data/collate.py
    packs_by_position): refuse a model whose forward takes no position ids, or an
    attention kernel that takes neither (flex attention), rather than train it with the
    documents attending to each other."""
    from transformers.utils.generic import is_flash_attention_requested

    forward = inspect.signature(model.forward).parameters
    if "position_ids" not in forward:
        raise UserError(
            f"data.isolate_documents: {type(model).__name__} takes no position_ids; "
            "turn it off for this model"
        )
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention not in ("eager", "sdpa") and not is_flash_attention_requested(model.config):
        raise UserError(
            "data.isolate_documents: needs eager, sdpa or flash attention, the model uses "
            f"{attention}"
        )


def load_model(
    cfg: ModelConfig,
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None = None,
    seed: int = 0,
    quantization: BitsAndBytesConfig | None = None,
    config: PretrainedConfig | None = None,
    dtype: str = "fp32",
) -> torch.nn.Module:
    """The model with the task's head: pretrained weights, or random ones (`from_scratch`),
    optionally quantized on load (QLoRA). A head whose size differs from the saved one
    (new labels) is re-initialised. `config`: the folder's config when already read;
    `dtype`: the weights' (trainer/model/dtypes.py), never left to transformers, whose
    default is the checkpoint's own. Base-model weights the task class has no place for
    (a pooler under MLM) are kept for the saved folders (trainer/model/carried.py)."""
    config = config or load_model_config(cfg, label_names)
    if cfg.from_scratch and cfg.tokenizer:
        _fit_to_tokenizer(config, tokenizer)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if spec.check_model_config is not None:
        spec.check_model_config(config)
    auto_class = getattr(transformers, spec.auto_class)
    torch.manual_seed(seed)  # the same random head / random init on every process
    attention = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.from_scratch:
        model = auto_class.from_config(config, trust_remote_code=cfg.trust_remote_code, **attention)
        if dtype != "auto":
            model.to(dtypes.to_torch(dtype))
    else:
        model, info = _loading(
            "weights",
            cfg.name_or_path,
            lambda: auto_class.from_pretrained(
                _source(cfg),
                config=config,
                trust_remote_code=cfg.trust_remote_code,
                ignore_mismatched_sizes=label_names is not None,
                **_revision(cfg),
                dtype=dtypes.to_torch(dtype),
                output_loading_info=True,
                **_quantized_loading(quantization),
                **attention,
            ),
        )
        mismatched = {key for key, *_ in info.get("mismatched_keys", ())}  # re-drawn too
        adapters.record_new_modules(model, {*info["missing_keys"], *mismatched})
        carried.record(model, info["unexpected_keys"], _source(cfg), cfg.revision)
        if quantization is not None:
            adapters.keep_4bit_layout(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        pieces = vocabulary.added_token_pieces(cfg.tokenizer) if cfg.tokenizer else {}
        if pieces:
            vocabulary.grow_embeddings(model, len(tokenizer), pieces)
        else:
            model.resize_token_embeddings(len(tokenizer))
    return model


def random_head(model: torch.nn.Module) -> list[str]:
    """Modules of the task head that the checkpoint lacked, so that transformers drew them
    at random (the MLM head of a sentence-embedding BERT such as all-MiniLM-L6-v2): what
    they output, and any loss or perplexity through them, is noise until trained. Modules
    inside the base model (a pooler) are not the head."""
    prefix = f"{model.base_model_prefix}."
    new = getattr(model, adapters.NEW_MODULES, ())
    return [name for name in new if not name.startswith(prefix)]


def warn_random_head(model: torch.nn.Module, where: str, task: str, consequence: str) -> None:
    """One warning line (from the main process) when the task's head was drawn at random."""
    head = random_head(model)
    if head:
        logger.warning(
            "%s has no trained %s head (%s drawn at random): %s",
            where,
            task,
            ", ".join(head),
            consequence,
        )


def _fit_to_tokenizer(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """A model built from scratch for its own tokenizer: one embedding row per token, and
    the special-token ids of that tokenizer rather than those of the config's model."""
    config.vocab_size = len(tokenizer)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(config, name) and getattr(tokenizer, name) is not None:
            setattr(config, name, getattr(tokenizer, name))


def _quantized_loading(quantization: BitsAndBytesConfig | None) -> dict:
    """bitsandbytes quantizes where the weights are placed: on this process's accelerator
    (its own GPU of a node's several; bitsandbytes has CUDA, XPU and MPS kernels), else the
    CPU, unless ZeRO-3 places them."""
    if quantization is None:
        return {}
    if is_deepspeed_zero3_enabled():  # ZeRO-3 places (and partitions) the weights itself
        return {"quantization_config": quantization}
    device = accelerator_type() or "cpu"
    if device in ("cuda", "xpu"):
        device = f"{device}:{PartialState().local_process_index}"
    return {"quantization_config": quantization, "device_map": {"": device}}
