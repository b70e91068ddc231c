"""Tiny models and tokenizers built locally (no hub): 2 layers, hidden 32.

The tokenizers are real `tokenizers` fast tokenizers (BERT: a fixed WordPiece vocabulary;
GPT-2: byte-level BPE trained on a small generated corpus), so tests exercise the real
fast-tokenizer code paths (word ids, sub-words, special tokens). Both are deterministic, so
pinned loss values hold from one session to the next.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    GPT2Config,
    PreTrainedTokenizerFast,
)

WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "the a patient doctor hospital reported severe mild pain fever after before treatment "
    "with dose of mg daily was were is good great bad terrible film movie service food "
    "staff room hotel really not very quite loved hated enjoyed boring amazing awful "
    "Paris London Berlin Alice Bob Acme Corp visited works for in on and or but"
).split()


def corpus(lines: int, seed: int = 0) -> list[str]:
    """Sentences of random vocabulary words (varied lengths)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 18))) + " ." for _ in range(lines)]


def wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    """A fixed WordPiece vocabulary: every character (alone and as `##` continuation), words
    of up to 4 letters whole, longer words as 4-letter pieces (`hospital` -> hosp ##ital).

    Built by hand because the `tokenizers` WordPiece trainer breaks ties between equally
    frequent merges differently from run to run, which would change token ids -- and every
    pinned loss -- between test sessions."""
    words = sorted({word.lower() for word in WORDS} | {"."})
    chars = sorted({char for word in words for char in word})
    pieces = [*specials, *chars, *(f"##{char}" for char in chars)]
    for word in words:
        chunks = [word[i : i + 4] for i in range(0, len(word), 4)]
        pieces += [chunks[0], *(f"##{chunk}" for chunk in chunks[1:])]
    return {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}


def build_bert(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer, saved to `folder`."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(wordpiece_vocab(specials), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=fast.pad_token_id,
    )
    AutoModelForMaskedLM.from_config(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def byte_level_bpe(vocab_size: int, specials: list[str]) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on the fixed corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        corpus(400),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tokenizer


def build_gpt2(folder: Path) -> Path:
    """A 2-layer GPT-2 (hidden 32) with a trained byte-level BPE tokenizer."""
    tokenizer = byte_level_bpe(300, ["<|endoftext|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    )
    config = GPT2Config(
        vocab_size=len(fast),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


# ChatML without generation markers, as Qwen's own template: turns are found by rendering
CHATML_PLAIN = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def llama_shape(vocab_size: int, **special_tokens):
    """The tests' 2-layer Llama shape (hidden 32, 2 heads, 256 positions)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **special_tokens,
    )


def build_llama_chat(folder: Path) -> Path:
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer that has ChatML's
    special tokens (EOS is <|im_end|>, the end of every turn) and ChatML as its template."""
    tokenizer = byte_level_bpe(320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
    )
    fast.chat_template = CHATML_PLAIN
    config = llama_shape(
        len(fast), eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
