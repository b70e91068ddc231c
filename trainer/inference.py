"""`trainer predict` and the `Predictor` API: a saved model's predictions on new text.

Inputs are sorted by length and padded per batch (dynamic padding), so a batch of short
texts costs what short texts cost; rows go back to input order before they are written.
What differs between tasks is one function each in `HEADS` (classification, NER, MLM,
CLM); loading, batching and precision are shared.

Several LoRA adapters trained on one base can be served from one loaded base: `add_adapter`
loads another adapter (and its own copy of the task head, `modules_to_save`) next to the
first, `use` switches between them without reloading anything. They must serve the same
task with the same number of labels: a head of another shape or class (a classifier next
to an NER tagger) would need a second base model, so it is refused with a message.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from trainer.commands.evaluate import scoring_config
from trainer.config import DataConfig, RunConfig
from trainer.data.read import read_split
from trainer.errors import UserError
from trainer.model import adapters
from trainer.model.load import load_tokenizer, load_trained, task_of_saved_model

INPUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_FILE = adapters.ADAPTER_CONFIG
LABELLED_TASKS = ("classification", "token-classification")
DEFAULT_ADAPTER = "default"  # the name MODEL_DIR's own adapter gets (peft's default name)


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


# --- reading inputs and configs -------------------------------------------------------------


def read_texts(source: str, data: DataConfig) -> list[str]:
    """Texts from `data.text_column` of a csv/tsv/jsonl file, or one per non-blank .txt line."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"--input: file not found: {source}")
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise UserError(f"--input: {path.name}: expected one of {', '.join(INPUT_SUFFIXES)}")
    # read as an LM split: only the text column is needed and checked (no labels, no tags)
    return [row["text"] for row in read_split(str(path), "--input", "clm", data).rows]


def predict_config(model_dir: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The config the model was trained with (columns, max_length, task), as `evaluate`
    builds it; a plain Hugging Face folder gets its task from its architecture or `task=`."""
    return scoring_config(model_dir, None, list(overrides))


def _head_labels(folder: str) -> list[str]:
    """The label names in id order saved in a model or adapter folder's config."""
    config = AutoConfig.from_pretrained(folder)
    return [config.id2label[i] for i in sorted(config.id2label)]


def _check_head(model_dir: str, task: str) -> None:
    """Refuse a task whose head the folder lacks: it would be random, and so would the output."""
    saved = task_of_saved_model(model_dir)
    if saved != task:
        heads = f"a {saved} head" if saved else "no task head"
        raise UserError(f"task: {model_dir} has {heads}; {task} predictions need a trained one")


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
        self.precision = precision
        self.quantized = cfg.peft.method == "qlora"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if not self.quantized:  # a 4-bit model was placed on its device when loaded
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
        cfg = predict_config(model_dir, overrides)
        PredictOptions(precision=precision).check()
        _check_head(model_dir, cfg.task)
        tokenizer = load_tokenizer(cfg.model, cfg.task)
        model = load_trained(
            model_dir, cfg.task, tokenizer, cfg.peft, precision, cfg.train.seed, base, adapter_name
        )
        if adapters.is_adapter_folder(model_dir):
            recorded_base, active = adapters.base_of(model_dir), adapter_name
        else:
            recorded_base, active = str(Path(model_dir).resolve()), None
        labels = _head_labels(model_dir)
        return cls(model, tokenizer, cfg, precision, labels, active, recorded_base)

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
        self._check_adapter(name, folder)
        if adapters.is_peft_model(self.model):
            self.model.load_adapter(folder, adapter_name=name)
        else:  # a full model: it becomes the base of a PEFT model
            self.model = adapters.load_adapter(self.model, folder, name)
            self.active = name
        self.labels[name] = _head_labels(folder)
        self.model.eval()
        if not self.quantized:
            self.model.to(self.device)

    def _check_adapter(self, name: str, folder: str) -> None:
        where = f"--adapter {name}={folder}"
        if name in self.adapter_names:
            raise UserError(f"{where}: an adapter named '{name}' is already loaded")
        if not adapters.is_adapter_folder(folder):
            raise UserError(f"{where}: not an adapter folder (no {ADAPTER_FILE})")
        task = task_of_saved_model(folder)
        if task != self.task:
            raise UserError(
                f"{where}: a {task} adapter can't share a base loaded for {self.task} "
                "(different heads need separate runs of trainer predict)"
            )
        if adapters.base_of(folder) != self.base:
            raise UserError(f"{where}: trained on {adapters.base_of(folder)}, not {self.base}")
        if len(_head_labels(folder)) != len(self.label_names):
            raise UserError(
                f"{where}: its head has {len(_head_labels(folder))} labels, the loaded one "
                f"{len(self.label_names)}; adapters on one base need heads of one size"
            )

    def use(self, name: str) -> None:
        """Serve the following predictions with adapter `name` (and its head)."""
        if name not in self.adapter_names:
            loaded = ", ".join(self.adapter_names) or "none"
            raise UserError(f"--use: no adapter named '{name}' (loaded: {loaded})")
        self.model.set_adapter(name)
        self.active = name

    def predict(self, texts: Sequence[str], options: PredictOptions | None = None) -> list[dict]:
        """One result row per text, in input order (see `HEADS` for each task's keys)."""
        options = options or PredictOptions(precision=self.precision)
        options.check()
        examples = self._encode(texts, options)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids), reverse=True)
        if options.temperature > 0:
            torch.manual_seed(self.cfg.train.seed)  # the same samples on every run
        rows: list[dict] = [{} for _ in examples]
        with torch.inference_mode(), self._autocast(options.precision):
            for start in range(0, len(order), options.batch_size):
                chunk = [examples[i] for i in order[start : start + options.batch_size]]
                for example, row in zip(chunk, self._run(chunk, options), strict=True):
                    rows[example.index] = row
        return rows

    # --- batching ------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], options: PredictOptions) -> list[Example]:
        """Token ids of every text: truncated to the trained `data.max_length`, except CLM
        prompts, which keep their end (the part the continuation follows)."""
        tagging = self.task == "token-classification"
        if tagging and not self.tokenizer.is_fast:
            raise UserError("MODEL_DIR: NER prediction needs a fast tokenizer (offsets)")
        clm = self.task == "clm"
        encoded = self.tokenizer(
            list(texts),
            truncation=not clm,
            max_length=None if clm else self.cfg.data.max_length,
            return_offsets_mapping=tagging,
            verbose=False,
        )
        limit = _prompt_limit(self.model.config, options.max_new_tokens) if clm else None
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
        inputs = pad_batch([e.ids for e in chunk], self.tokenizer.pad_token_id, self.task == "clm")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        return HEADS[self.task](self, chunk, inputs, options)

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


# --- one function per task: (predictor, examples, padded inputs, options) -> rows -----------


def _classify(predictor: Predictor, chunk, inputs, options) -> list[dict]:
    """`label`, its `score`, and the `probabilities` of every class."""
    probs = predictor.model(**inputs).logits.float().softmax(-1).cpu()
    names = predictor.label_names
    rows = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        rows.append(
            {
                "label": names[best],
                "score": row[best],
                "probabilities": dict(zip(names, row, strict=True)),
            }
        )
    return rows


@dataclass
class WordTag:
    """A word's predicted tag (from its first sub-token) and its character span."""

    tag: str
    score: float
    start: int
    end: int


def _tag_entities(predictor: Predictor, chunk, inputs, options) -> list[dict]:
    """`entities`: spans of consecutive words tagged B-X / I-X, with character offsets."""
    probs = predictor.model(**inputs).logits.float().softmax(-1).cpu()
    best_probs, best_ids = probs.max(-1)
    names = predictor.label_names
    rows = []
    for b, example in enumerate(chunk):
        words: dict[int, WordTag] = {}
        for t, word in enumerate(example.word_ids):
            if word is None:
                continue
            start, end = example.offsets[t]
            if word not in words:  # the first sub-token decides the word's tag
                tag = names[best_ids[b, t].item()]
                words[word] = WordTag(tag, best_probs[b, t].item(), start, end)
            words[word].end = end
        rows.append({"entities": merge_entities(list(words.values()), example.text)})
    return rows


def _split_tag(tag: str) -> tuple[str, str]:
    """('B', 'PER') for B-PER; an unprefixed tag (IO scheme) counts as inside its type."""
    if tag[:2] in ("B-", "I-", "E-", "S-"):
        return tag[0], tag[2:]
    return ("O", "") if tag == "O" else ("I", tag)


def merge_entities(words: list[WordTag], text: str) -> list[dict]:
    """Entities from word tags: B-X starts one, I-X right after an X word continues it
    (an I-X after anything else starts one, as seqeval reads it), O ends it. The score is
    the mean probability of the entity's words."""
    spans: list[tuple[str, list[WordTag]]] = []
    previous_type = ""
    for word in words:
        prefix, kind = _split_tag(word.tag)
        if prefix == "I" and kind == previous_type:
            spans[-1][1].append(word)
        elif prefix != "O":
            spans.append((kind, [word]))
        previous_type = kind
    return [
        {
            "type": kind,
            "text": text[members[0].start : members[-1].end],
            "start": members[0].start,
            "end": members[-1].end,
            "score": sum(w.score for w in members) / len(members),
        }
        for kind, members in spans
    ]


def _fill_masks(predictor: Predictor, chunk, inputs, options) -> list[dict]:
    """`fills`: for each mask token, in text order, the top-k tokens with probabilities."""
    logits = predictor.model(**inputs).logits
    mask_id = predictor.tokenizer.mask_token_id
    top_k = min(options.top_k, logits.shape[-1])
    rows = []
    for b in range(len(chunk)):
        positions = (inputs["input_ids"][b] == mask_id).nonzero().flatten()
        top = logits[b, positions].float().softmax(-1).topk(top_k, dim=-1)
        fills = [
            [
                {"token": predictor.tokenizer.decode([i]), "token_id": i, "score": p}
                for p, i in zip(scores, ids, strict=True)
            ]
            for scores, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        rows.append({"fills": fills})
    return rows


def _generate(predictor: Predictor, chunk, inputs, options) -> list[dict]:
    """`generated`: the continuation of each prompt (greedy at temperature 0)."""
    sampling = options.temperature > 0
    settings = {"temperature": options.temperature, "top_p": options.top_p} if sampling else {}
    output = predictor.model.generate(
        **inputs,
        max_new_tokens=options.max_new_tokens,
        do_sample=sampling,
        pad_token_id=predictor.tokenizer.pad_token_id,
        **settings,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    texts = predictor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [{"generated": text} for text in texts]


HEADS: dict[str, Callable[..., list[dict]]] = {
    "classification": _classify,
    "token-classification": _tag_entities,
    "mlm": _fill_masks,
    "clm": _generate,
}


# --- the command -------------------------------------------------------------------------------


def parse_adapters(items: Sequence[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` pairs from repeated --adapter options, each a distinct name."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--adapter: expected NAME=DIR, got '{item}'")
        if name in dict(pairs):
            raise UserError(f"--adapter: the name '{name}' is given twice")
        pairs.append((name, folder))
    return pairs


def _primary(model_dir: str, pairs: list[tuple[str, str]]) -> tuple[str, str, str | None]:
    """The folder loaded first, its adapter name and the base it goes on: MODEL_DIR itself,
    or, for a plain MODEL_DIR with --adapter options, the first adapter on MODEL_DIR."""
    if adapters.is_adapter_folder(model_dir) or not pairs:
        return model_dir, DEFAULT_ADAPTER, None
    name, folder = pairs[0]
    if not adapters.is_adapter_folder(folder):
        raise UserError(
            f"--adapter {name}={folder}: not an adapter folder (no adapter_config.json)"
        )
    return folder, name, model_dir


def load_predictor(
    model_dir: str,
    overrides: Sequence[str],
    precision: str,
    adapter_items: Sequence[str] = (),
    use: str | None = None,
) -> Predictor:
    """MODEL_DIR (its own adapter, if it is an adapter folder, is named `default`) plus the
    --adapter NAME=DIR ones; a plain MODEL_DIR with adapters is taken as their base."""
    pairs = parse_adapters(adapter_items)
    folder, name, base = _primary(model_dir, pairs)
    predictor = Predictor.load(folder, overrides, precision, name, base)
    for other, other_folder in pairs[1:] if base else pairs:  # with a base, pairs[0] is loaded
        predictor.add_adapter(other, other_folder)
    if use is not None:
        predictor.use(use)
    return predictor


def predict_file(
    model_dir: str,
    source: str,
    target: str,
    overrides: Sequence[str] = (),
    options: PredictOptions | None = None,
    adapter_items: Sequence[str] = (),
    use: str | None = None,
) -> dict:
    """Predict every input of `source` into jsonl `target`; returns rows, seconds, rows/s.
    The input is read before the model is loaded, so a bad file fails in a second."""
    options = options or PredictOptions()
    options.check()
    folder, _, _ = _primary(model_dir, parse_adapters(adapter_items))
    texts = read_texts(source, predict_config(folder, overrides).data)
    predictor = load_predictor(model_dir, overrides, options.precision, adapter_items, use)
    started = time.perf_counter()
    rows = predictor.predict(texts, options)
    seconds = time.perf_counter() - started
    write_jsonl(Path(target), rows)
    return {"rows": len(rows), "seconds": round(seconds, 3), "rows_per_s": len(rows) / seconds}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write all rows under a temporary name, then rename: no half-written output file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(path)
