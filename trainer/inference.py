"""The `Predictor` API (`from trainer.inference import Predictor`): a saved model's
predictions on new text, as `trainer predict` makes them.

Inputs are sorted by length and padded per batch (dynamic padding), so a batch of short
texts costs what short texts cost; rows go back to input order. What differs between tasks
is the task spec's prediction head (trainer/tasks/heads.py); loading, batching and
precision are shared.

Several LoRA adapters trained on one base can be served from one loaded base: `add_adapter`
loads another adapter (and its own copy of the task head, `modules_to_save`) next to the
first, `use` switches between them without reloading anything. They must serve the same
task with the same number of labels: a head of another shape or class (a classifier next
to an NER tagger) would need a second base model, so it is refused with a message.
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
from trainer.model import adapters
from trainer.model.load import load_tokenizer
from trainer.model.saved import DEFAULT_ADAPTER, SavedModel
from trainer.tasks.heads import WordTag, merge_entities
from trainer.tasks.registry import task_spec

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = ["PredictOptions", "Predictor", "WordTag", "merge_entities"]  # the public API


@dataclass
class PredictOptions:
    """How to predict: batching, precision, and the MLM / CLM decoding settings."""

    batch_size: int = 32
    precision: str = "no"
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
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class Example:
    """One tokenized input; NER keeps which word each token belongs to and where it is."""

    index: int  # position in the input, to restore the order after sorting
    text: str
    ids: list[int]
    word_ids: list[int | None] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)


def _check_head(saved: SavedModel, task: str) -> None:
    """Refuse a task whose head the folder lacks: it would be random, and so would the output."""
    head = saved.task.name if saved.task else None
    if head != task:
        heads = f"a {head} head" if head else "no task head"
        raise UserError(f"task: {saved.folder} has {heads}; {task} predictions need a trained one")


# --- the predictor ---------------------------------------------------------------------------


class Predictor:
    """A loaded model that predicts on lists of texts; LoRA adapters on its base can be
    added (`add_adapter`) and switched (`use`) without loading the base again."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        cfg: RunConfig,
        precision: str = "no",
        labels: list[str] | None = None,
        adapter: str | None = None,
        base: str = "",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.task = cfg.task
        self.head = task_spec(cfg).prediction
        self.precision = precision
        self.quantized = cfg.peft.method == "qlora"
        if self.quantized:  # a 4-bit model was placed on its device when loaded
            self.device = next(self.model.parameters()).device
        else:
            self.device = compute_device()
            self.model.to(self.device)
        self.active = adapter  # the adapter in use; None for a full model
        self.labels: dict[str | None, list[str]] = {adapter: labels or []}
        self.base = base  # the base that added adapters must have been trained on

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
        model = saved.load(
            spec,
            tokenizer,
            cfg.peft,
            precision,
            cfg.train.seed,
            base,
            adapter_name,
            cfg.model.dtype,
        )
        if saved.is_adapter:
            recorded_base, active = saved.base, adapter_name
        else:
            recorded_base, active = str(saved.folder.resolve()), None
        return cls(model, tokenizer, cfg, precision, saved.head_labels, active, recorded_base)

    @property
    def adapter_names(self) -> list[str]:
        """Names of the loaded adapters (empty for a full model)."""
        return list(self.model.peft_config) if adapters.is_peft_model(self.model) else []

    @property
    def label_names(self) -> list[str]:
        """Label names of the head now in use (each adapter keeps its own)."""
        return self.labels[self.active]

    def add_adapter(self, name: str, folder: str) -> None:
        """Load another adapter trained on the same base for the same task (`use` serves it)."""
        saved = self._checked_adapter(name, folder)
        if adapters.is_peft_model(self.model):
            self.model.load_adapter(folder, adapter_name=name)
        else:  # a full model: it becomes the base of a PEFT model
            self.model = adapters.load_adapter(self.model, folder, name)
            self.active = name
        self.labels[name] = saved.head_labels
        self.model.eval()
        if not self.quantized:
            self.model.to(self.device)

    def _checked_adapter(self, name: str, folder: str) -> SavedModel:
        where = f"--adapter {name}={folder}"
        if name in self.adapter_names:
            raise UserError(f"{where}: an adapter named '{name}' is already loaded")
        saved = SavedModel.read_adapter(folder, where)
        task = saved.task.name if saved.task else None
        if task != self.task:
            raise UserError(
                f"{where}: a {task} adapter can't share a base loaded for {self.task} "
                "(different heads need separate runs of trainer predict)"
            )
        if saved.base != self.base:
            raise UserError(f"{where}: trained on {saved.base}, not {self.base}")
        if len(saved.head_labels) != len(self.label_names):
            raise UserError(
                f"{where}: its head has {len(saved.head_labels)} labels, the loaded one "
                f"{len(self.label_names)}; adapters on one base need heads of one size"
            )
        return saved

    def use(self, name: str) -> None:
        """Serve the following predictions with adapter `name` (and its head)."""
        if name not in self.adapter_names:
            loaded = ", ".join(self.adapter_names) or "none"
            raise UserError(f"--use: no adapter named '{name}' (loaded: {loaded})")
        self.model.set_adapter(name)
        self.active = name

    def predict(self, texts: Sequence[str], options: PredictOptions | None = None) -> list[dict]:
        """One result row per text, in input order (see tasks/heads.py for each task's keys)."""
        options = options or PredictOptions(precision=self.precision)
        options.check()
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

    # --- batching ------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], options: PredictOptions) -> list[Example]:
        """Token ids of every text: truncated to the trained `data.max_length`, except CLM
        prompts, which keep their end (the part the continuation follows)."""
        tagging, generating = self.head.word_offsets, self.head.generates
        if tagging and not self.tokenizer.is_fast:
            raise UserError(f"MODEL_DIR: {self.task} prediction needs a fast tokenizer (offsets)")
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

    def _run(self, chunk: list[Example], options: PredictOptions) -> list[dict]:
        """Pad one batch (left for generation, right otherwise) and apply the task's head."""
        ids = [e.ids for e in chunk]
        inputs = pad_batch(ids, self.tokenizer.pad_token_id, self.head.generates)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        return self.head.run(self, chunk, inputs, options)

    def _autocast(self, precision: str) -> contextlib.AbstractContextManager:
        if precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[precision])


def _prompt_limit(config, max_new_tokens: int) -> int | None:
    """Prompt tokens that leave room for the continuation within the model's positions."""
    positions = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None
    )
    return max(1, positions - max_new_tokens) if positions else None


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    """Ids and attention mask padded to the longest sequence of this batch only."""
    width = max(len(seq) for seq in sequences)
    ids, mask = [], []
    for seq in sequences:
        fill = width - len(seq)
        ids.append([pad_id] * fill + seq if left else seq + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(seq) if left else [1] * len(seq) + [0] * fill)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
