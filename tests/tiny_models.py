"""Tiny models and tokenizers built locally (no hub): 2 layers, hidden 32.

The tokenizers are trained on a small generated corpus with the `tokenizers` library,
so tests exercise the real fast-tokenizer code paths (word ids, special tokens).
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

WORDS = (
    "the a patient doctor hospital reported severe mild pain fever after before treatment "
    "with dose of mg daily was were is good great bad terrible film movie service food "
    "staff room hotel really not very quite loved hated enjoyed boring amazing awful "
    "Paris London Berlin Alice Bob Acme Corp visited works for in on and or but"
).split()


def corpus(lines: int, seed: int = 0) -> list[str]:
    """Sentences of random vocabulary words (varied lengths)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 18))) + " ." for _ in range(lines)]


def build_bert(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32) with a trained WordPiece tokenizer, saved to `folder`."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        corpus(400), trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    )
    config = BertConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256, pad_token_id=fast.pad_token_id,
    )
    AutoModelForMaskedLM.from_config(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def build_gpt2(folder: Path) -> Path:
    """A 2-layer GPT-2 (hidden 32) with a trained byte-level BPE tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        corpus(400),
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=1024,
    )
    config = GPT2Config(
        vocab_size=len(fast), n_embd=32, n_layer=2, n_head=2, n_positions=256,
        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
