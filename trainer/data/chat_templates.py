"""Chat templates for supervised fine-tuning: the tokenizer's own, or `data.chat_template`.

`data.chat_template` is a Jinja file or one of a few well-known names. The template is set
on the tokenizer before anything is tokenized, so it is part of the tokenization cache key
and is saved with the tokenizer into final/ (transformers writes it to
chat_template.jinja): `trainer predict` and `transformers.pipeline` then render prompts the
way training did.

The shipped templates mark the assistant's part with `{% generation %}`, which
`apply_chat_template(return_assistant_tokens_mask=True)` turns into the answer mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from trainer.config import DataConfig

# ChatML (Qwen, many instruction-tuned models): <|im_start|>role\n...<|im_end|>\n
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3 instruct: headers, and <|eot_id|> at the end of every turn
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
NAMED = {"chatml": CHATML, "llama-3": LLAMA3}
# Tokens that end an assistant's turn in the well-known templates (ChatML, Llama 3, Phi,
# Gemma): generation stops at one when the template writes it and it is one token.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def template_text(name_or_file: str) -> str:
    """A named template, or the text of a Jinja file; one line when neither."""
    if name_or_file in NAMED:
        return NAMED[name_or_file]
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        names = ", ".join(NAMED)
        raise UserError(
            f"data.chat_template: {name_or_file} is neither a file nor a known name ({names})"
        )
    text = path.read_text(encoding="utf-8")
    if "messages" not in text:
        raise UserError(f"data.chat_template: {name_or_file} does not read `messages`")
    return text


def set_chat_template(tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> None:
    """Put `data.chat_template` on the tokenizer (it wins over the tokenizer's own)."""
    if data.chat_template is not None:
        tokenizer.chat_template = template_text(data.chat_template)


def require_template(tokenizer: PreTrainedTokenizerBase, key: str) -> str:
    """The tokenizer's template; a base model without one gets one line saying what to set."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError(
            f"{key}: chat messages need a chat template, and this tokenizer has none; set "
            f"data.chat_template to a Jinja file or one of {', '.join(NAMED)}"
        )
    return template


def has_generation_markers(template: str) -> bool:
    """Whether the template marks the assistant's tokens itself ({% generation %})."""
    return "generation" in template and "endgeneration" in template


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, eos: int | list[int] | None) -> list[int]:
    """Where an answer ends: EOS (the tokenizer's, and the model's generation config's
    `eos`) and the template's end-of-turn token, which chat models' tokenizers do not
    always name as EOS (Llama 3's base tokenizer ends text with <|end_of_text|>)."""
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    ids.append(tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None) or ""
    vocabulary = tokenizer.get_vocab()
    ids += [vocabulary[token] for token in END_OF_TURN if token in template and token in vocabulary]
    return sorted({i for i in ids if i is not None})
