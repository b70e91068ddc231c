"""What `trainer predict` makes of each task's outputs: one function per task, from
(predictor, examples, padded inputs, options) to one result row per example."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainer.data.chat_templates import stop_token_ids
from trainer.tasks.tag_schemes import decode, resolve

if TYPE_CHECKING:
    from trainer.inference import Predictor


def classify(predictor: Predictor, chunk, inputs, options) -> list[dict]:
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


def tag_entities(predictor: Predictor, chunk, inputs, options) -> list[dict]:
    """`entities`: the words' tags read in the run's tag scheme, with character offsets."""
    probs = predictor.model(**inputs).logits.float().softmax(-1).cpu()
    best_probs, best_ids = probs.max(-1)
    names = predictor.label_names
    scheme = resolve(predictor.cfg.data.tag_scheme, names)
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
        rows.append({"entities": merge_entities(list(words.values()), example.text, scheme)})
    return rows


def merge_entities(words: list[WordTag], text: str, scheme: str | None = None) -> list[dict]:
    """Entities from word tags, decoded as evaluation decodes them (tasks/tag_schemes.py);
    `scheme` unset: detected from these tags. The score is the mean probability of the
    entity's words."""
    tags = [word.tag for word in words]
    entities = []
    for kind, first, stop in decode(tags, scheme or resolve(None, tags)):
        members = words[first:stop]
        entities.append(
            {
                "type": kind,
                "text": text[members[0].start : members[-1].end],
                "start": members[0].start,
                "end": members[-1].end,
                "score": sum(w.score for w in members) / len(members),
            }
        )
    return entities


def fill_masks(predictor: Predictor, chunk, inputs, options) -> list[dict]:
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


def generate(predictor: Predictor, chunk, inputs, options) -> list[dict]:
    """`generated`: the continuation of each prompt (greedy at temperature 0); an answer of
    a chat model stops at EOS or at the template's end of turn."""
    sampling = options.temperature > 0
    settings = {"temperature": options.temperature, "top_p": options.top_p} if sampling else {}
    if predictor.head.chat:
        eos = predictor.model.generation_config.eos_token_id
        settings["eos_token_id"] = stop_token_ids(predictor.tokenizer, eos)
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
