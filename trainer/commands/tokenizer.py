"""`trainer tokenizer train` and `trainer tokenizer extend`: a tokenizer for a domain.

`train` fits a new fast tokenizer with the `tokenizers` library, with the special tokens
and post-processing its model family expects:

- wordpiece: BERT-style; lower-casing BERT normaliser, `[PAD] [UNK] [CLS] [SEP] [MASK]`,
  `[CLS] A [SEP] B [SEP]` with token types 0/1 (what MLM and NSP need);
- bpe: GPT-2-style byte-level BPE (no unknown tokens) with `<|endoftext|>` as BOS/EOS;
- unigram: SentencePiece-style (NFKC, `▁` word marker) with ALBERT's set `<pad> <unk>
  [CLS] [SEP] [MASK]` and the BERT pair template, so it serves MLM and NSP too.

`extend` adds frequent domain words that a tokenizer fragments (see model/vocabulary.py). Both
save a `PreTrainedTokenizerFast` folder that `AutoTokenizer.from_pretrained` loads and that
`model.tokenizer` names, and both report the average tokens per word on a sample of the
corpus, for the new tokenizer and for a reference one (fewer is better: shorter sequences
and whole-word units): the CLI prints the report's lines, then its JSON.
"""

from __future__ import annotations

import glob
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import ByteLevel, TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from trainer import progress
from trainer.config import DataConfig, load_config
from trainer.data.read import TEXT, read_split
from trainer.errors import UserError
from trainer.logs import get_logger
from trainer.model import vocabulary

logger = get_logger(__name__)

KINDS = ("wordpiece", "bpe", "unigram")
SPECIAL_TOKENS = {
    "wordpiece": {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "unigram": {
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
}
MODEL_MAX_LENGTH = 512  # BERT's position limit; a run's data.max_length cuts shorter
SAMPLE_TEXTS = 2000  # texts the tokens-per-word figure is measured on


# --- the corpus ----------------------------------------------------------------------------


def _files(sources: list[str], key: str) -> list[Path]:
    """Files named directly or by glob patterns; one that matches nothing is an error."""
    paths = []
    for source in sources:
        pattern = str(Path(source).expanduser())
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise UserError(f"{key}: file not found: {source}")
        paths += [Path(m) for m in matches]
    return paths


def read_corpus(sources: list[str], key: str) -> tuple[list[str], str | None]:
    """The texts of text files (one per non-blank line), csv/tsv/jsonl/json/parquet files
    (their `text` column), or of a run config's data.train (validation text is left out, so
    that validation measures text the tokenizer has not seen); and the tokenizer of that
    config's model (not `model.tokenizer`, which may be the one being trained), the natural
    reference."""
    if len(sources) == 1 and sources[0].endswith((".yaml", ".yml")):
        cfg = load_config(sources[0])
        split = read_split(cfg.data.train, "data.train", TEXT, cfg.data)
        return [row["text"] for row in split.rows], cfg.model.name_or_path
    texts = []
    for path in _files(sources, key):
        texts += [row["text"] for row in read_split(str(path), key, TEXT, DataConfig()).rows]
    return texts, None


def sample(texts: list[str]) -> list[str]:
    """A seeded sample of at most SAMPLE_TEXTS texts, to measure on."""
    if len(texts) <= SAMPLE_TEXTS:
        return texts
    return random.Random(0).sample(texts, SAMPLE_TEXTS)


def tokens_per_word(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> float:
    """Tokens (special tokens left out) per whitespace-separated word of the texts."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return sum(map(len, ids)) / max(sum(len(text.split()) for text in texts), 1)


# --- training ------------------------------------------------------------------------------


def _bert_template(tokenizer: Tokenizer, cls: str, sep: str) -> TemplateProcessing:
    ids = [(token, tokenizer.token_to_id(token)) for token in (cls, sep)]
    return TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=ids
    )


def _untrained(kind: str, vocab_size: int) -> tuple[Tokenizer, trainers.Trainer]:
    """The tokenizer pipeline of `kind` before training, and its trainer."""
    specials = list(dict.fromkeys(SPECIAL_TOKENS[kind].values()))
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        return tokenizer, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = ByteLevel(trim_offsets=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet
        )
        return tokenizer, trainer
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>"
    )
    return tokenizer, trainer


def train_tokenizer(texts: list[str], kind: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A fast tokenizer of `kind` trained on the texts (see the module docstring)."""
    if kind not in KINDS:
        raise UserError(f"--type: '{kind}' is not one of {', '.join(KINDS)}")
    specials = SPECIAL_TOKENS[kind]
    if vocab_size <= len(set(specials.values())):
        raise UserError(f"--vocab-size: {vocab_size} leaves no room beside the special tokens")
    tokenizer, trainer = _untrained(kind, vocab_size)
    trainer.show_progress = progress.enabled()  # the `tokenizers` library's own bars
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    if "cls_token" in specials:
        tokenizer.post_processor = _bert_template(
            tokenizer, specials["cls_token"], specials["sep_token"]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=MODEL_MAX_LENGTH, **specials
    )


# --- the commands --------------------------------------------------------------------------


def _fresh_folder(out: str) -> Path:
    folder = Path(out).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--out: {out} exists and is not an empty folder")
    return folder


def _load(name: str, key: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}: could not load the tokenizer '{name}': {first}") from None


def _compare(tokenizer, reference: str | None, texts: list[str], key: str) -> dict:
    """Tokens per word of the new tokenizer and, when it loads, of the reference."""
    measured = sample(texts)
    result = {
        "texts_measured": len(measured),
        "tokens_per_word": tokens_per_word(tokenizer, measured),
    }
    if reference:
        try:
            ratio = tokens_per_word(_load(reference, key), measured)
        except UserError as err:
            logger.warning("reference tokenizer skipped: %s", err)
            return result
        # transformers builds an empty tokenizer from a folder that holds only a config.json
        # (configs/models/tiny-gpt2): a ratio of 0 compares with nothing
        if ratio == 0:
            logger.warning("reference tokenizer skipped: %s has no vocabulary", reference)
        else:
            result |= {"reference_tokens_per_word": ratio, "reference": reference}
    return result


def train_command(
    sources: list[str], kind: str, vocab_size: int, out: str, reference: str | None
) -> tuple[dict, list[str]]:
    """`trainer tokenizer train`: train, save, compare; returns the result (printed as JSON)
    and the report's lines."""
    folder = _fresh_folder(out)
    texts, config_reference = read_corpus(sources, "CORPUS")
    tokenizer = train_tokenizer(texts, kind, vocab_size)
    tokenizer.save_pretrained(folder)
    trained = f"trained a {kind} tokenizer of {len(tokenizer)} tokens on {len(texts)} texts"
    result = {"type": kind, "vocab_size": len(tokenizer), "out": str(folder)}
    result |= _compare(tokenizer, reference or config_reference, texts, "--reference")
    return result, [f"{trained} -> {out}", _comparison(result)]


def extend_command(
    base: str, corpus: list[str], count: int, out: str, min_frequency: int = 2
) -> tuple[dict, list[str]]:
    """`trainer tokenizer extend`: add the words that save the most tokens, save the
    tokenizer and its extension record, compare with the base; returns the result (printed
    as JSON) and the report's lines."""
    if count < 1:
        raise UserError(f"--add: must be > 0, got {count}")
    folder = _fresh_folder(out)
    texts, _ = read_corpus(corpus, "--corpus")
    tokenizer = _load(base, "BASE_TOKENIZER")
    base_size = len(tokenizer)
    words = vocabulary.choose_words(tokenizer, texts, count, min_frequency)
    if not words:
        raise UserError(f"--corpus: no word occurs {min_frequency}+ times in several pieces")
    vocabulary.extend(tokenizer, words)
    tokenizer.save_pretrained(folder)
    vocabulary.save_record(folder, base, base_size, words)
    if len(words) < count:
        logger.warning("only %d words occur %d+ times in several pieces", len(words), min_frequency)
    lines = [f"added {len(words)} tokens to {base} ({base_size} -> {len(tokenizer)}) -> {out}"]
    lines += [f"  {w.token:24} x{w.frequency:<5} was {' '.join(w.pieces)}" for w in words]
    result = {"added": len(words), "vocab_size": len(tokenizer), "out": str(folder)}
    result |= _compare(tokenizer, base, texts, "BASE_TOKENIZER")
    return result, [*lines, _comparison(result)]


def _comparison(result: dict) -> str:
    line = f"tokens per word on {result['texts_measured']} texts: {result['tokens_per_word']:.3f}"
    if "reference_tokens_per_word" in result:
        line += f" (reference {result['reference']}: {result['reference_tokens_per_word']:.3f})"
    return line
