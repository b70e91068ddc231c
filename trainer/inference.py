"""The `Predictor` API (`from trainer.inference import Predictor`): a saved model's
predictions on new text, as `trainer predict` makes them.

Inputs are sorted by length and padded per batch (dynamic padding), so a batch of short
texts costs what short texts cost (on a GPU, each batch's length is rounded up to a
multiple of 8, which its tensor cores want); rows go back to input order.
`PredictOptions.quantize` makes the Linear layers int8 for CPU inference
(trainer/model/int8.py). What differs between tasks is the task spec's prediction head
(trainer/tasks/heads.py); loading, batching and precision are shared.

Several LoRA adapters trained on one base can be served from one loaded base: `add_adapter`
loads another adapter, of any task, next to the first, `use` switches between them without
reloading anything. Adapters of one task and head size go into one PeftModel (peft's
multi-adapter API, each with its own copy of the head, `modules_to_save`); another task or
head size gets a model of its own class whose backbone holds the same base weights
(trainer/model/shared_base.py), so N tasks cost one base plus their heads and adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from trainer import progress
from trainer.config import RunConfig
from trainer.devices import compute_device
from trainer.errors import UserError
from trainer.model import adapters, int8, shared_base
from trainer.model.load import load_tokenizer
from trainer.model.saved import DEFAULT_ADAPTER, SavedModel
from trainer.tasks.heads import WordTag, merge_entities
from trainer.tasks.registry import TASKS, task_spec

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZE = ("no", "int8")
# Padding a batch to a multiple of 8 tokens lets a GPU's tensor cores take every matmul;
# on a CPU it is only more tokens to compute (benchmarks/inference.py measures it).
GPU_PAD_MULTIPLE = 8
Prompt = str | list[dict]  # a text, or (sft) a conversation ending with the user's turn
__all__ = ["PredictOptions", "Predictor", "WordTag", "merge_entities"]  # the public API


@dataclass
class PredictOptions:
    """How to predict: batching, precision, int8, and the MLM / CLM decoding settings."""

    batch_size: int = 32
    precision: str = "no"
    quantize: str = "no"  # int8: dynamic int8 Linear layers, on CPU (trainer/model/int8.py)
    pad_to_multiple_of: int | None = None  # None: 8 on a CUDA GPU, 1 (no rounding) elsewhere
    top_k: int = 5  # mlm: fills per mask
    max_new_tokens: int = 32  # clm
    temperature: float = 0.0  # clm: 0 is greedy
    top_p: float = 1.0  # clm: nucleus sampling when temperature > 0

    def check(self) -> None:
        """All bad values in one message, each naming its option."""
        problems = [
            f"--{name.replace('_', '-')}: must be > 0, got {value}"
            for name, value in vars(self).items()
            if name in ("batch_size", "top_k", "max_new_tokens") and not value > 0
        ]
        if not self.temperature >= 0:
            problems.append(f"--temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.precision not in ("no", *AUTOCAST_DTYPES):
            problems.append(f"--precision: '{self.precision}' is not one of no, bf16, fp16")
        elif self.precision == "fp16" and not torch.cuda.is_available():
            problems.append("--precision: fp16 needs CUDA; use bf16 or no on CPU")
        if self.pad_to_multiple_of is not None and not self.pad_to_multiple_of > 0:
            problems.append(f"--pad-to-multiple-of: must be > 0, got {self.pad_to_multiple_of}")
        problems += self._quantize_problems()
        if problems:
            raise UserError("; ".join(problems))

    def _quantize_problems(self) -> list[str]:
        if self.quantize not in QUANTIZE:
            return [f"--quantize: '{self.quantize}' is not one of {', '.join(QUANTIZE)}"]
        if self.quantize == "no":
            return []
        if self.precision != "no":  # int8 Linear layers take float32 inputs only
            return [f"--quantize int8: computes in float32; drop --precision {self.precision}"]
        device = compute_device().type
        if device != "cpu":  # torch's dynamic int8 kernels (fbgemm, onednn) are CPU ones
            return [f"--quantize int8: runs on CPU only, this machine computes on {device}"]
        return []

    def pad_multiple(self, device: torch.device) -> int:
        """What each batch's width is rounded up to on `device` (1: not rounded)."""
        if self.pad_to_multiple_of is not None:
            return self.pad_to_multiple_of
        return GPU_PAD_MULTIPLE if device.type == "cuda" else 1


@dataclass
class Example:
    """One tokenized input; NER keeps which word each token belongs to and where it is."""

    index: int  # position in the input, to restore the order after sorting
    text: Prompt
    ids: list[int]
    word_ids: list[int | None] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)


def _check_head(saved: SavedModel, task: str) -> None:
    """Refuse a task whose head the folder lacks: it would be random, and so would the output.
    Tasks with one head class share it (an sft model's head is a causal LM's)."""
    head = saved.task.name if saved.task else None
    spec = TASKS.get(task)
    same_head = None not in (saved.task, spec) and saved.task.auto_class == spec.auto_class
    if head != task and not same_head:
        heads = f"a {head} head" if head else "no task head"
        raise UserError(f"task: {saved.folder} has {heads}; {task} predictions need a trained one")


# --- the predictor ---------------------------------------------------------------------------


@dataclass
class Served:
    """What one adapter (or the full model, under the name None) predicts with: its task
    model (shared with the adapters of the same task and head size), the run config it
    was trained with, its tokenizer and its head's label names."""

    model: torch.nn.Module
    cfg: RunConfig
    tokenizer: PreTrainedTokenizerBase
    labels: list[str]


class Predictor:
    """A loaded model that predicts on lists of texts; LoRA adapters on its base, of any
    task, can be added (`add_adapter`) and switched (`use`) without loading the base again."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        cfg: RunConfig,
        precision: str = "no",
        labels: list[str] | None = None,
        adapter: str | None = None,
        base: str = "",
        backbone: shared_base.Backbone | None = None,
        overrides: Sequence[str] = (),
        base_folder: str | None = None,
    ) -> None:
        self.precision = precision
        self.quantized = cfg.peft.method == "qlora"
        if self.quantized:  # a 4-bit model was placed on its device when loaded
            self.device = next(model.parameters()).device
        else:
            self.device = compute_device()
        self.base = base  # the base that added adapters must have been trained on
        self.int8 = False  # Linear layers made int8 (`PredictOptions.quantize`): no way back
        self.base_folder = base_folder  # where it was loaded from, when not the recorded one
        self.overrides = tuple(overrides)  # applied to every added adapter's run config
        # the base's weights that models of other tasks hold too (see model/shared_base.py)
        if backbone is None and not adapters.is_peft_model(model):
            backbone = shared_base.backbone_parameters(model)
        self.backbone = backbone
        self.served: dict[str | None, Served] = {}
        self._add_served(adapter, Served(model, cfg, tokenizer, labels or []))
        self._serve(adapter)

    @classmethod
    def load(
        cls,
        model_dir: str,
        overrides: Sequence[str] = (),
        precision: str = "no",
        adapter_name: str = DEFAULT_ADAPTER,
        base: str | None = None,
    ) -> Predictor:
        """Load a run's final/ (full model or adapter folder) or a Hugging Face folder; an
        adapter folder's adapter is named `adapter_name`, its base taken from `base` if given."""
        return cls.from_saved(SavedModel.read(model_dir), overrides, precision, adapter_name, base)

    @classmethod
    def from_saved(
        cls,
        saved: SavedModel,
        overrides: Sequence[str] = (),
        precision: str = "no",
        adapter_name: str = DEFAULT_ADAPTER,
        base: str | None = None,
    ) -> Predictor:
        """`load` for a folder already read."""
        cfg = saved.run_config(overrides)
        PredictOptions(precision=precision).check()
        _check_head(saved, cfg.task)
        spec = task_spec(cfg)
        tokenizer = load_tokenizer(cfg.model, spec)
        seed, dtype = cfg.train.seed, cfg.model.dtype
        if saved.is_adapter:
            model = saved.load_base(spec, tokenizer, cfg.peft, precision, seed, base, dtype)
            backbone = shared_base.backbone_parameters(model)  # before LoRA wraps its layers
            model = adapters.load_adapter(model, saved.folder, adapter_name)
            recorded_base, active = saved.base, adapter_name
        else:
            model = saved.load(spec, tokenizer, cfg.peft, precision, seed, model_dtype=dtype)
            backbone = shared_base.backbone_parameters(model)
            recorded_base, active = str(saved.folder.resolve()), None
        labels = saved.head_labels
        return cls(
            model,
            tokenizer,
            cfg,
            precision,
            labels,
            active,
            recorded_base,
            backbone,
            overrides,
            base,
        )

    @property
    def adapter_names(self) -> list[str]:
        """Names of the loaded adapters, in load order (empty for a full model)."""
        return [name for name in self.served if name is not None]

    @property
    def label_names(self) -> list[str]:
        """Label names of the head now in use (each adapter keeps its own)."""
        return self.served[self.active].labels

    @property
    def models(self) -> list[torch.nn.Module]:
        """The distinct task models loaded (one per task and head size); their backbones
        hold the same base weights."""
        return list({id(served.model): served.model for served in self.served.values()}.values())

    def add_adapter(self, name: str, folder: str) -> None:
        """Load another adapter trained on the same base, for any task (`use` serves it):
        into the loaded model of its task and head size when there is one (peft's
        multi-adapter API), else into a new model of its task whose backbone holds the
        loaded base's weights (no second copy)."""
        where = f"--adapter {name}={folder}"
        saved = self._checked_adapter(name, folder)
        cfg = saved.run_config(self.overrides)
        _check_head(saved, cfg.task)
        spec = task_spec(cfg)
        tokenizer = load_tokenizer(cfg.model, spec)
        same_head = self._model_with_head(spec.auto_class, len(saved.head_labels))
        if same_head is not None and adapters.is_peft_model(same_head):
            same_head.load_adapter(folder, adapter_name=name)
            model = same_head
        elif same_head is not None:  # a full model: it becomes the base of a PeftModel
            model = adapters.load_adapter(same_head, folder, name)
            self.served.pop(None, None)  # it now serves through its adapters only
            self.active = name
        else:
            model = self._task_model(saved, cfg, tokenizer, name, where)
        self._add_served(name, Served(model, cfg, tokenizer, saved.head_labels))
        if self.active == name:
            self._serve(name)

    def _model_with_head(self, auto_class: str, size: int) -> torch.nn.Module | None:
        """The loaded model whose task class and head size an adapter's match, if any."""
        for served in self.served.values():
            spec = task_spec(served.cfg)
            if spec.auto_class == auto_class and len(served.labels) == size:
                return served.model
        return None

    def _task_model(
        self,
        saved: SavedModel,
        cfg: RunConfig,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        where: str,
    ) -> torch.nn.Module:
        """A model of the adapter's task on the base, holding the loaded base's weights,
        with the adapter (and its head) on it."""
        if self.quantized or cfg.peft.method == "qlora":
            raise UserError(
                f"{where}: adapters of another task or head size can't share a QLoRA base "
                "yet (4-bit weights); run trainer predict once per adapter"
            )
        if self.backbone is None:
            raise UserError(f"{where}: load the first model with Predictor.load to add others")
        spec = task_spec(cfg)
        model = saved.load_base(
            spec,
            tokenizer,
            cfg.peft,
            self.precision,
            cfg.train.seed,
            self.base_folder,
            cfg.model.dtype,
        )
        shared_base.share_backbone(model, self.backbone, where)
        return adapters.load_adapter(model, saved.folder, name)

    def _add_served(self, name: str | None, served: Served) -> None:
        served.model.eval()
        if not self.quantized:
            served.model.to(self.device)
        self.served[name] = served

    def _serve(self, name: str | None) -> None:
        """Point the predicting code (tasks/heads.py, batching) at `name`'s model."""
        served = self.served[name]
        self.model, self.tokenizer, self.cfg = served.model, served.tokenizer, served.cfg
        self.task = served.cfg.task
        self.head = task_spec(served.cfg).prediction
        self.active = name

    def _checked_adapter(self, name: str, folder: str) -> SavedModel:
        where = f"--adapter {name}={folder}"
        if name in self.adapter_names:
            raise UserError(f"{where}: an adapter named '{name}' is already loaded")
        saved = SavedModel.read_adapter(folder, where)
        if saved.base != self.base:
            raise UserError(f"{where}: trained on {saved.base}, not {self.base}")
        return saved

    def use(self, name: str) -> None:
        """Serve the following predictions with adapter `name` (its task, its head)."""
        if name not in self.adapter_names:
            loaded = ", ".join(self.adapter_names) or "none"
            raise UserError(f"--use: no adapter named '{name}' (loaded: {loaded})")
        self.served[name].model.set_adapter(name)
        self._serve(name)

    def predict(self, texts: Sequence[Prompt], options: PredictOptions | None = None) -> list[dict]:
        """One result row per text, in input order (see tasks/heads.py for each task's keys);
        an sft model also takes conversations, lists of {role, content} ending with the
        user's turn."""
        options = options or PredictOptions(precision=self.precision)
        options.check()
        self._quantize(options.quantize)
        examples = self._encode(texts, options)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids), reverse=True)
        if options.temperature > 0:
            torch.manual_seed(self.cfg.train.seed)  # the same samples on every run
        rows: list[dict] = [{} for _ in examples]
        shown = progress.bar(desc="predict", total=len(order), unit="rows")
        with torch.inference_mode(), self._autocast(options.precision), shown:
            for start in range(0, len(order), options.batch_size):
                chunk = [examples[i] for i in order[start : start + options.batch_size]]
                for example, row in zip(chunk, self._run(chunk, options), strict=True):
                    rows[example.index] = row
                shown.update(len(chunk))
        return rows

    def _quantize(self, quantize: str) -> None:
        """Make the Linear layers int8 on the first prediction that asks for it, in place:
        the float32 weights are not kept, so a later float32 prediction needs a new load."""
        if (quantize == "int8") == self.int8:
            return
        if self.int8:
            raise UserError("--quantize: this model's Linear layers are int8 now; load it again")
        if self.quantized:
            raise UserError("--quantize int8: a QLoRA model is 4-bit already")
        if len(self.adapter_names) > 1:  # un-merged ones would sit on int8 base layers
            raise UserError(
                f"--quantize int8: merges the adapter in use into the base; load it alone "
                f"(loaded: {', '.join(self.adapter_names)})"
            )
        labels = self.label_names
        merged = int8.quantize_linear_layers(self.model).eval()
        # the adapter is merged into the base: what is served is one full model now
        self.served = {None: Served(merged, self.cfg, self.tokenizer, labels)}
        self._serve(None)
        self.int8 = True

    # --- batching ------------------------------------------------------------------------

    def _encode(self, texts: Sequence[Prompt], options: PredictOptions) -> list[Example]:
        """Token ids of every text: truncated to the trained `data.max_length`, except CLM
        prompts, which keep their end (the part the continuation follows)."""
        tagging, generating = self.head.word_offsets, self.head.generates
        if tagging and not self.tokenizer.is_fast:
            raise UserError(f"MODEL_DIR: {self.task} prediction needs a fast tokenizer (offsets)")
        if self.head.chat and getattr(self.tokenizer, "chat_template", None):
            encoded = {"input_ids": [self._chat_prompt(text) for text in texts]}
        elif any(not isinstance(text, str) for text in texts):
            raise UserError(
                f"--input: chat messages need a chat template, and {self.task} model "
                f"{self.cfg.model.name_or_path}'s tokenizer has none; give plain prompts"
            )
        else:
            encoded = self.tokenizer(
                list(texts),
                truncation=not generating,
                max_length=None if generating else self.cfg.data.max_length,
                return_offsets_mapping=tagging,
                verbose=False,
            )
        limit = _prompt_limit(self.model.config, options.max_new_tokens) if generating else None
        examples = []
        for i, text in enumerate(texts):
            ids = encoded["input_ids"][i][-limit:] if limit else encoded["input_ids"][i]
            example = Example(i, text, ids)
            if tagging:
                example.word_ids, example.offsets = (
                    encoded.word_ids(i),
                    encoded["offset_mapping"][i],
                )
            examples.append(example)
        return examples

    def _chat_prompt(self, prompt: Prompt) -> list[int]:
        """An sft model's prompt: the conversation so far (a text: the user's turn),
        rendered by the template the model was trained with (saved with its tokenizer), up
        to the assistant's turn."""
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        rendered = self.tokenizer.apply_chat_template(
            turns, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return rendered["input_ids"]

    def _run(self, chunk: list[Example], options: PredictOptions) -> list[dict]:
        """Pad one batch (left for generation, right otherwise) and apply the task's head."""
        ids = [e.ids for e in chunk]
        width = self._width(max(len(seq) for seq in ids), options)
        inputs = pad_batch(ids, self.tokenizer.pad_token_id, self.head.generates, width)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        return self.head.run(self, chunk, inputs, options)

    def _width(self, longest: int, options: PredictOptions) -> int:
        """The longest input rounded up to the padding multiple, within the model's
        positions (and, for generation, leaving room for the new tokens)."""
        multiple = options.pad_multiple(self.device)
        width = -(-longest // multiple) * multiple
        limit = _positions(self.model.config)
        if limit and self.head.generates:
            limit -= options.max_new_tokens
        return max(longest, min(width, limit)) if limit else width

    def _autocast(self, precision: str) -> contextlib.AbstractContextManager:
        if precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[precision])


def _positions(config) -> int | None:
    """How many positions the model has (None: not said, e.g. rotary embeddings)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _prompt_limit(config, max_new_tokens: int) -> int | None:
    """Prompt tokens that leave room for the continuation within the model's positions."""
    positions = _positions(config)
    return max(1, positions - max_new_tokens) if positions else None


def pad_batch(
    sequences: list[list[int]], pad_id: int, left: bool, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Ids and attention mask padded to `width`, by default the longest sequence of this
    batch only."""
    width = width or max(len(seq) for seq in sequences)
    ids, mask = [], []
    for seq in sequences:
        fill = width - len(seq)
        ids.append([pad_id] * fill + seq if left else seq + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(seq) if left else [1] * len(seq) + [0] * fill)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
