"""trainer.data.encode: packed LM blocks are full, padding-free and in document order."""

from __future__ import annotations

from itertools import chain

import pytest
import tiny_models

from trainer.data.encode import (
    IGNORE_INDEX,
    Packer,
    encode_classification,
    encode_token_classification,
    pack_for_clm,
    pack_for_mlm,
)
from trainer.data.read import Split
from trainer.errors import UserError

MAX_LENGTH = 32


def text_split(lines: int, seed: int = 11) -> Split:
    texts = tiny_models.corpus(lines, seed=seed)
    return Split("data.train", [{"text": t} for t in texts], [f"line {i}" for i in range(lines)])


def test_mlm_blocks_are_full_and_free_of_padding(bert_tokenizer):
    split = text_split(120)
    packed = pack_for_mlm(split, bert_tokenizer, MAX_LENGTH)
    assert len(packed) > 10
    for block in packed:
        assert len(block["input_ids"]) == MAX_LENGTH
        assert len(block["special_tokens_mask"]) == MAX_LENGTH
        assert len(block["word_start"]) == MAX_LENGTH
        assert bert_tokenizer.pad_token_id not in block["input_ids"]


def test_mlm_blocks_are_the_tokenized_stream_cut_in_order(bert_tokenizer):
    split = text_split(120)
    packed = pack_for_mlm(split, bert_tokenizer, MAX_LENGTH)
    stream = list(chain.from_iterable(bert_tokenizer([r["text"] for r in split.rows])["input_ids"]))
    joined = list(chain.from_iterable(packed["input_ids"]))
    assert joined == stream[: len(stream) // MAX_LENGTH * MAX_LENGTH]
    special_ids = {bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id}
    flags = list(chain.from_iterable(packed["special_tokens_mask"]))
    assert [bool(f) for f in flags] == [i in special_ids for i in joined]


def test_mlm_word_starts_follow_wordpiece_continuations(bert_tokenizer):
    packed = pack_for_mlm(text_split(60), bert_tokenizer, MAX_LENGTH)
    continuation_seen = False
    for block in packed:
        tokens = bert_tokenizer.convert_ids_to_tokens(block["input_ids"])
        for token, start, special in zip(
            tokens, block["word_start"], block["special_tokens_mask"], strict=True
        ):
            if special:
                assert not start
            elif token.startswith("##"):
                continuation_seen = True
                assert not start, token
            else:
                assert start, token
    assert continuation_seen, "the tiny vocabulary should split some words"


def test_clm_documents_are_joined_by_eos(gpt2_tokenizer):
    split = text_split(120)
    packed = pack_for_clm(split, gpt2_tokenizer, MAX_LENGTH)
    eos = gpt2_tokenizer.eos_token_id
    documents = gpt2_tokenizer([r["text"] for r in split.rows], add_special_tokens=False)
    stream = list(chain.from_iterable([*doc, eos] for doc in documents["input_ids"]))
    joined = list(chain.from_iterable(packed["input_ids"]))
    assert all(len(block) == MAX_LENGTH for block in packed["input_ids"])
    assert joined == stream[: len(stream) // MAX_LENGTH * MAX_LENGTH]
    # Cutting the joined blocks at EOS gives back the documents, in order.
    pieces, current = [], []
    for token in joined:
        if token == eos:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    assert len(pieces) > 10
    assert pieces == documents["input_ids"][: len(pieces)]
    assert set(packed.column_names) == {"input_ids"}


def test_packing_carries_across_tokenizer_calls_and_drops_less_than_one_block(gpt2_tokenizer):
    split = text_split(2500)  # three calls of PACK_GROUP texts
    packed = pack_for_clm(split, gpt2_tokenizer, MAX_LENGTH)
    documents = gpt2_tokenizer([r["text"] for r in split.rows], add_special_tokens=False)
    total = sum(len(doc) + 1 for doc in documents["input_ids"])
    kept = len(packed) * MAX_LENGTH
    assert total - MAX_LENGTH < kept <= total
    assert kept / total > 0.999


def test_packer_state_resumes_between_calls():
    whole, first = Packer(4), Packer(4)
    docs = [{"input_ids": [[1, 2, 3]]}, {"input_ids": [[4, 5]]}, {"input_ids": [[6, 7, 8, 9]]}]
    expected = [whole.add(doc)["input_ids"] for doc in docs]
    assert expected == [[], [[1, 2, 3, 4]], [[5, 6, 7, 8]]]
    first.add(docs[0])
    second = Packer(4)
    second.load_state_dict(first.state_dict())
    assert [second.add(doc)["input_ids"] for doc in docs[1:]] == expected[1:]
    assert second.state_dict() == {"carry": {"input_ids": [9]}}


def test_too_little_text_for_one_block_is_an_error(bert_tokenizer):
    with pytest.raises(UserError, match=r"data.train: the texts hold fewer than data.max_length"):
        pack_for_mlm(text_split(2), bert_tokenizer, 512)


def test_classification_encoding_truncates_and_maps_labels(bert_tokenizer):
    rows = [{"text": " ".join(["good"] * 50), "label": "pos"}, {"text": "bad", "label": "neg"}]
    split = Split("data.train", rows, ["r1", "r2"])
    encoded = encode_classification(split, bert_tokenizer, {"neg": 0, "pos": 1}, 16)
    assert encoded["labels"] == [1, 0]
    assert len(encoded["input_ids"][0]) == 16
    assert encoded["input_ids"][1][0] == bert_tokenizer.cls_token_id


def test_ner_tags_go_on_first_sub_token_only(bert_tokenizer):
    words = ["Acme", "hospital", "Berlin", "reported"]
    rows = [{"tokens": words, "tags": ["B-ORG", "O", "B-LOC", "O"]}]
    label_ids = {"O": 0, "B-LOC": 1, "B-ORG": 2}
    encoded = encode_token_classification(Split("d", rows, ["r"]), bert_tokenizer, label_ids, 64)
    labels = encoded["labels"][0]
    tokens = bert_tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    assert labels[0] == IGNORE_INDEX and labels[-1] == IGNORE_INDEX  # [CLS], [SEP]
    labelled = [label for label in labels if label != IGNORE_INDEX]
    assert labelled == [2, 0, 1, 0]
    for token, label in zip(tokens, labels, strict=True):
        if token.startswith("##"):
            assert label == IGNORE_INDEX
