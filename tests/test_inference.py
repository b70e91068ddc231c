"""`trainer predict` and the `Predictor` API on tiny models: every task's rows (one per input,
in input order, the right keys), length-sorted batches equal to one input at a time, a LoRA
final/ equal to the in-memory model after training, adapters switched on one base equal to
each adapter loaded alone, and bad input rejected in one line."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_run_config, reset_accelerate, write_csv, write_jsonl
from peft import PeftModel

from trainer.cli import main
from trainer.errors import UserError
from trainer.inference import PredictOptions, Predictor, WordTag, merge_entities
from trainer.tasks.tag_schemes import decode

SENTENCES = [
    "the film was really good .",
    "bad",
    "Alice visited Paris and London with Bob after the treatment .",
    "terrible service , the staff at Acme Corp were boring and the room awful .",
    "the doctor reported mild fever",
    "amazing",
]
# LoRA classification runs: no validation, so final/ is the model as training left it.
LORA = {"peft": {"method": "lora"}, "data": {"validation": None}}


def cli(capsys, *argv) -> tuple[int, str, str]:
    reset_accelerate()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_run(folder: Path, task: str, models: dict, data_dir: Path, **sections) -> Path:
    """Train a tiny run through the CLI; returns its final/."""
    folder.mkdir(parents=True, exist_ok=True)
    reset_accelerate()
    config = make_run_config(folder, task, models, data_dir, **sections)
    assert main(["train", str(config)]) == 0
    return folder / "run" / "final"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models_by_task, data_dir):
    """Tiny trained runs shared by the module: an NER model, a fully fine-tuned classifier
    and two LoRA classifiers on the tiny BERT (same seed: the BERT pooler, missing from the
    MLM base, is drawn from it), the first with the in-memory model that its final/ was
    saved from."""
    root = tmp_path_factory.mktemp("predict-runs")
    models = tiny_models_by_task
    saved: list[PeftModel] = []
    real_save = PeftModel.save_pretrained

    def keep(model: PeftModel, *args, **kwargs):
        saved.append(model)
        return real_save(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PeftModel, "save_pretrained", keep)
        lora_a = train_run(
            root / "lora_a",
            "classification",
            models,
            data_dir,
            train={"epochs": 2, "lr": 2e-2, "seed": 42},
            **LORA,
        )
    lora_b = train_run(
        root / "lora_b",
        "classification",
        models,
        data_dir,
        train={"epochs": 1, "lr": 5e-3, "seed": 42, "max_steps": 6},
        **LORA,
    )
    ner = train_run(
        root / "ner", "token-classification", models, data_dir, train={"epochs": 2, "lr": 5e-3}
    )
    full = train_run(
        root / "full", "classification", models, data_dir, train={"epochs": 4, "lr": 3e-3}
    )
    finals = {"lora_a": lora_a, "lora_b": lora_b, "ner": ner, "full": full}
    return {"final": finals, "in_memory": saved[-1]}


@pytest.fixture
def sentences_csv(tmp_path) -> Path:
    rows = [{"id": i, "text": text} for i, text in enumerate(SENTENCES)]
    return write_csv(tmp_path / "inputs.csv", rows)


# --- one test per task ------------------------------------------------------------------------


def test_classification_rows(runs, sentences_csv, tmp_path, capsys):
    output = tmp_path / "out" / "predictions.jsonl"
    code, out, err = cli(
        capsys, "predict", runs["final"]["lora_a"], "--input", sentences_csv, "--output", output
    )
    assert code == 0, err
    assert "rows/s" in out and json.loads(out.splitlines()[-1])["rows"] == len(SENTENCES)
    rows = read_rows(output)
    assert len(rows) == len(SENTENCES)
    for i, (row, text) in enumerate(zip(rows, SENTENCES, strict=True)):
        assert set(row) == {"id", "text", "label", "score", "probabilities"}
        assert (row["id"], row["text"]) == (str(i), text)  # csv ids are read as text
        assert set(row["probabilities"]) == {"negative", "positive"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert row["score"] == max(row["probabilities"].values())
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    # input order: each row is what the text alone gets
    alone = Predictor.load(str(runs["final"]["lora_a"])).predict(SENTENCES[2:3])[0]
    assert rows[2]["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-5)


def test_ner_entities_index_the_text(runs, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in SENTENCES])
    output = tmp_path / "ner.jsonl"
    code, _, err = cli(
        capsys, "predict", runs["final"]["ner"], "--input", source, "--output", output
    )
    assert code == 0, err
    rows = read_rows(output)
    assert len(rows) == len(SENTENCES)
    found = [entity for row in rows for entity in row["entities"]]
    assert found, "the trained tagger finds entities"
    for text, row in zip(SENTENCES, rows, strict=True):
        for entity in row["entities"]:
            assert set(entity) == {"type", "text", "start", "end", "score"}
            assert text[entity["start"] : entity["end"]] == entity["text"]
            assert entity["type"] in ("PER", "LOC", "ORG") and 0 < entity["score"] <= 1
    assert {"type": "LOC", "text": "Paris"} in [
        {"type": e["type"], "text": e["text"]} for e in rows[2]["entities"]
    ]


def test_merge_entities_follows_iob2():
    text = "Alice Smith met Bob in New York Paris"
    spans = [(0, 5), (6, 11), (12, 15), (16, 19), (20, 22), (23, 26), (27, 31), (32, 37)]
    tags = ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC", "B-LOC"]
    scores = [0.9, 0.7, 0.99, 0.8, 0.9, 0.6, 0.4, 0.5]
    words = [WordTag(t, p, s, e) for t, p, (s, e) in zip(tags, scores, spans, strict=True)]
    entities = merge_entities(words, text)
    assert [(e["type"], e["text"]) for e in entities] == [
        ("PER", "Alice Smith"),
        ("PER", "Bob"),
        ("LOC", "New York"),
        ("LOC", "Paris"),
    ]
    assert entities[0]["score"] == pytest.approx(0.8)
    assert entities[2]["score"] == pytest.approx(0.5)
    # read strictly, as evaluation reads it: in IOB2 an I- tag without its B- is no entity
    stray = [WordTag("I-ORG", 0.5, 0, 4), WordTag("I-LOC", 0.5, 5, 8)]
    assert merge_entities(stray, "Acme Ulm", "iob2") == []
    assert [e["text"] for e in merge_entities(stray, "Acme Ulm", "io")] == ["Acme", "Ulm"]


def test_predict_shows_the_entities_evaluation_counts(runs, data_dir, tmp_path, capsys):
    """On a trained model: the precision, recall and per-type F1 of `trainer evaluate` are
    exactly those of the entities `trainer predict` shows, scored against the gold tags read
    by the same decoder. The tiny model tags its validation set perfectly, so a fifth of
    the gold tags are redrawn (ill-formed sequences too): some entities right, some not."""
    rng = random.Random(0)
    names = ["O", "B-LOC", "B-ORG", "I-ORG", "B-PER"]  # the tags the model knows
    rows = read_rows(data_dir / "ner_validation.jsonl")
    for row in rows:
        row["tags"] = [rng.choice(names) if rng.random() < 0.2 else t for t in row["tags"]]
    gold_file = write_jsonl(tmp_path / "redrawn.jsonl", rows)
    texts = [" ".join(row["tokens"]) for row in rows]
    predicted = Predictor.load(str(runs["final"]["ner"])).predict(texts)
    counts: dict[str, list[int]] = {}  # type: tp, fp, fn
    for row, result in zip(rows, predicted, strict=True):
        starts = [0]
        for word in row["tokens"][:-1]:
            starts.append(starts[-1] + len(word) + 1)
        ends = [start + len(word) for start, word in zip(starts, row["tokens"], strict=True)]
        shown = {
            (e["type"], starts.index(e["start"]), ends.index(e["end"]) + 1)
            for e in result["entities"]
        }
        gold = set(decode(row["tags"], "iob2"))
        for kind in {e[0] for e in shown | gold}:
            mine = {e for e in shown if e[0] == kind}
            theirs = {e for e in gold if e[0] == kind}
            found = [len(mine & theirs), len(mine - theirs), len(theirs - mine)]
            counts[kind] = [a + b for a, b in zip(counts.get(kind, [0, 0, 0]), found, strict=True)]
    code, out, err = cli(capsys, "evaluate", runs["final"]["ner"], "--data", gold_file)
    assert code == 0, err
    results = json.loads(out.splitlines()[-1])
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    assert tp > 0 and fp + fn > 0  # some right and some wrong: the comparison means something
    assert results["precision"] == pytest.approx(tp / (tp + fp), abs=1e-9)
    assert results["recall"] == pytest.approx(tp / (tp + fn), abs=1e-9)
    for kind, (tp, fp, fn) in counts.items():
        assert results["f1_per_type"][kind] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-9)


def test_mlm_fills_each_mask(tiny_bert, tmp_path, capsys):
    texts = ["the [MASK] was good .", "[MASK] visited [MASK] with Bob", "no mask here"]
    source = tmp_path / "masked.txt"
    source.write_text("\n".join(texts) + "\n")
    output = tmp_path / "fills.jsonl"
    argv = ["predict", tiny_bert, "--input", source, "--output", output, "--top-k", "3"]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    rows = read_rows(output)
    assert [len(row["fills"]) for row in rows] == [1, 2, 0]
    for fills in rows[1]["fills"]:
        assert len(fills) == 3 and set(fills[0]) == {"token", "token_id", "score"}
        scores = [fill["score"] for fill in fills]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


def test_clm_generates_greedily(tiny_gpt2, tmp_path, capsys):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(SENTENCES) + "\n")
    output = tmp_path / "gen.jsonl"
    argv = ["predict", tiny_gpt2, "--input", source, "--output", output, "--max-new-tokens", "6"]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    rows = read_rows(output)
    assert len(rows) == len(SENTENCES)
    assert all(set(row) == {"id", "text", "generated"} for row in rows)
    # the continuation of a prompt is model.generate's on that prompt alone
    predictor = Predictor.load(str(tiny_gpt2))
    ids = predictor.tokenizer(SENTENCES[1], return_tensors="pt")["input_ids"]
    expected = predictor.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert rows[1]["generated"] == predictor.tokenizer.decode(expected[0, ids.shape[1] :])


# --- batching ----------------------------------------------------------------------------------


def _flatten(row: dict) -> list[float]:
    """Every number a row holds, to compare rows to a tolerance."""
    if "probabilities" in row:
        return list(row["probabilities"].values())
    if "entities" in row:
        return [v for e in row["entities"] for v in (e["start"], e["end"], e["score"])]
    return [fill["score"] for fills in row["fills"] for fill in fills]


@pytest.mark.parametrize("which", ["lora_a", "ner", "mlm"])
def test_sorted_batches_match_one_at_a_time(runs, tiny_bert, which):
    folder = tiny_bert if which == "mlm" else runs["final"][which]
    texts = [t.replace("the", "[MASK]", 1) for t in SENTENCES] if which == "mlm" else SENTENCES
    predictor = Predictor.load(str(folder))
    batched = predictor.predict(texts, PredictOptions(batch_size=4))
    single = predictor.predict(texts, PredictOptions(batch_size=1))
    for many, one in zip(batched, single, strict=True):
        assert many.keys() == one.keys()
        assert _flatten(many) == pytest.approx(_flatten(one), abs=1e-5)
        assert many.get("label") == one.get("label")


def test_clm_batches_match_one_at_a_time(tiny_gpt2):
    predictor = Predictor.load(str(tiny_gpt2))
    options = {"max_new_tokens": 5}
    batched = predictor.predict(SENTENCES, PredictOptions(batch_size=3, **options))
    single = predictor.predict(SENTENCES, PredictOptions(batch_size=1, **options))
    assert batched == single


@pytest.mark.parametrize("which", ["lora_a", "ner", "mlm", "clm"])
def test_padding_to_a_multiple_predicts_the_same(runs, tiny_bert, tiny_gpt2, which):
    """Batches padded to a multiple of 8 (or 5) give what batches padded to their longest
    input give, for every task, CLM's left padding included."""
    folder = {"mlm": tiny_bert, "clm": tiny_gpt2}.get(which) or runs["final"][which]
    texts = [t.replace("the", "[MASK]", 1) for t in SENTENCES] if which == "mlm" else SENTENCES
    predictor = Predictor.load(str(folder))
    longest = max(len(ids) for ids in predictor.tokenizer(texts)["input_ids"])
    extra = {"max_new_tokens": 5} if which == "clm" else {}
    tight = predictor.predict(texts, PredictOptions(batch_size=4, pad_to_multiple_of=1, **extra))
    for multiple in (8, 5):
        options = PredictOptions(batch_size=4, pad_to_multiple_of=multiple, **extra)
        assert predictor._width(longest, options) % multiple == 0
        assert predictor._width(longest, options) > longest or longest % multiple == 0
        padded = predictor.predict(texts, options)
        if which == "clm":
            assert padded == tight
            continue
        for many, few in zip(padded, tight, strict=True):
            assert _flatten(many) == pytest.approx(_flatten(few), abs=1e-5)
            assert many.get("label") == few.get("label")


def test_padding_stays_within_the_positions(runs):
    """Rounding up never asks for more positions than the model has (256 in the tiny BERT),
    nor, for generation, more than leave room for the new tokens; CPU rounds to 1 by default."""
    predictor = Predictor.load(str(runs["final"]["lora_a"]))
    assert predictor._width(250, PredictOptions(pad_to_multiple_of=64)) == 256
    assert predictor._width(256, PredictOptions(pad_to_multiple_of=100)) == 256
    assert predictor._width(13, PredictOptions()) == 13  # the CPU default: no rounding
    assert PredictOptions().pad_multiple(torch.device("cuda")) == 8


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".txt"])
def test_rows_carry_the_input_text_and_id(runs, tmp_path, capsys, suffix):
    """Each output row starts with its input's `id` (the file's id column; a .txt line's
    number, blank lines counted) and `text`; a file without ids gives rows without one."""
    ids = ["r-7", "r-3", "x", "r-1", "q", "z"]
    rows = [{"id": i, "text": t} for i, t in zip(ids, SENTENCES, strict=True)]
    source = tmp_path / f"in{suffix}"
    if suffix == ".csv":
        write_csv(source, rows)
    elif suffix == ".jsonl":
        write_jsonl(source, [{**row, "id": n} for n, row in enumerate(rows, start=100)])
        ids = list(range(100, 100 + len(rows)))
    else:
        source.write_text("\n\n".join(SENTENCES[:3]) + "\n" + "\n".join(SENTENCES[3:]) + "\n")
        ids = [1, 3, 5, 6, 7, 8]
    output = tmp_path / "out.jsonl"
    code, _, err = cli(
        capsys, "predict", runs["final"]["lora_a"], "--input", source, "--output", output
    )
    assert code == 0, err
    got = read_rows(output)
    assert [(row["id"], row["text"]) for row in got] == list(zip(ids, SENTENCES, strict=True))
    assert all(list(row)[:2] == ["id", "text"] and "label" in row for row in got)
    no_ids = write_csv(tmp_path / "plain.csv", [{"text": t} for t in SENTENCES])
    assert (
        cli(capsys, "predict", runs["final"]["lora_a"], "--input", no_ids, "--output", output)[0]
        == 0
    )
    assert [list(row)[:2] for row in read_rows(output)] == [["text", "label"]] * len(SENTENCES)


# --- int8 --------------------------------------------------------------------------------------


def sentiment_texts(data_dir: Path) -> list[dict]:
    """The 240 rows of the tiny classification data (train and validation)."""
    names = ("sentiment_train.csv", "sentiment_validation.csv")
    return [row for name in names for row in csv.DictReader((data_dir / name).open())]


def test_int8_labels_agree_with_float32(runs, data_dir):
    """On the trained tiny classifier and its 240 texts (fp32 gets most of them right, so
    both labels are at stake), int8 gives fp32's label for at least 95% of them, while the
    probabilities do move: the Linear layers are int8 indeed."""
    rows = sentiment_texts(data_dir)
    texts = [row["text"] for row in rows]
    folder = str(runs["final"]["full"])
    fp32 = Predictor.load(folder).predict(texts)
    right = sum(p["label"] == row["label"] for p, row in zip(fp32, rows, strict=True))
    assert right / len(rows) >= 0.8
    predictor = Predictor.load(folder)
    int8 = predictor.predict(texts, PredictOptions(quantize="int8"))
    kinds = {type(module) for module in predictor.model.modules()}
    assert torch.ao.nn.quantized.dynamic.Linear in kinds and torch.nn.Linear not in kinds
    pairs = list(zip(int8, fp32, strict=True))
    same = sum(a["label"] == b["label"] for a, b in pairs) / len(texts)
    gap = max(abs(a["score"] - b["probabilities"][a["label"]]) for a, b in pairs)
    assert same >= 0.95, same
    assert 0 < gap < 0.2
    again = predictor.predict(texts[:4], PredictOptions(quantize="int8"))  # quantized once
    assert [row["label"] for row in again] == [row["label"] for row in int8[:4]]
    with pytest.raises(UserError, match="int8 now; load it again"):
        predictor.predict(texts[:4])


def test_int8_merges_a_lora_adapter_first(runs):
    """An adapter folder's LoRA layers are merged into the base, then the base quantized:
    the result is close to the un-merged float32 adapter."""
    folder = str(runs["final"]["lora_a"])
    fp32 = Predictor.load(folder).predict(SENTENCES)
    predictor = Predictor.load(folder)
    int8 = predictor.predict(SENTENCES, PredictOptions(quantize="int8"))
    assert predictor.adapter_names == []
    assert not any(type(m) is torch.nn.Linear for m in predictor.model.modules())
    for a, b in zip(int8, fp32, strict=True):
        assert list(a["probabilities"].values()) == pytest.approx(
            list(b["probabilities"].values()), abs=0.05
        )


def test_int8_is_refused_off_the_cpu(monkeypatch):
    """On a machine that computes on a GPU, int8 is one error line before any loading."""
    monkeypatch.setattr("trainer.inference.compute_device", lambda: torch.device("cuda"))
    with pytest.raises(UserError, match=r"--quantize int8: runs on CPU only, .* on cuda"):
        PredictOptions(quantize="int8").check()


def test_int8_refuses_several_adapters(runs):
    shared = Predictor.load(str(runs["final"]["lora_a"]))
    shared.add_adapter("b", str(runs["final"]["lora_b"]))
    with pytest.raises(UserError, match=r"load it alone \(loaded: default, b\)"):
        shared.predict(SENTENCES, PredictOptions(quantize="int8"))


# --- LoRA adapters -----------------------------------------------------------------------------


def test_lora_final_predicts_like_the_trained_model(runs):
    predictor = Predictor.load(str(runs["final"]["lora_a"]))
    in_memory = runs["in_memory"].eval()
    encoded = predictor.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = in_memory(**encoded).logits.softmax(-1)
        loaded = predictor.model(**encoded).logits.softmax(-1)
    torch.testing.assert_close(loaded, expected, atol=1e-6, rtol=0)
    rows = predictor.predict(SENTENCES)
    got = torch.tensor([list(row["probabilities"].values()) for row in rows])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_switching_adapters_equals_loading_each_alone(runs):
    a, b = str(runs["final"]["lora_a"]), str(runs["final"]["lora_b"])
    alone_a = Predictor.load(a).predict(SENTENCES)
    alone_b = Predictor.load(b).predict(SENTENCES)
    assert alone_a != alone_b
    shared = Predictor.load(a)
    base = shared.model.get_base_model()
    shared.add_adapter("b", b)
    assert shared.adapter_names == ["default", "b"]
    for name, expected in [("b", alone_b), ("default", alone_a), ("b", alone_b)]:
        shared.use(name)
        got = shared.predict(SENTENCES)
        for row, want in zip(got, expected, strict=True):
            assert row["label"] == want["label"]
            assert list(row["probabilities"].values()) == pytest.approx(
                list(want["probabilities"].values()), abs=1e-6
            )
    assert shared.model.get_base_model() is base  # one base, never reloaded


def test_cli_adapters_on_a_plain_base(runs, tiny_bert, sentences_csv, tmp_path, capsys):
    a, b = runs["final"]["lora_a"], runs["final"]["lora_b"]
    alone = tmp_path / "alone.jsonl"
    assert cli(capsys, "predict", b, "--input", sentences_csv, "--output", alone)[0] == 0
    for model_dir, extra in [
        (a, ["--adapter", f"b={b}", "--use", "b"]),
        (tiny_bert, ["--adapter", f"a={a}", "--adapter", f"b={b}", "--use", "b"]),
    ]:
        output = tmp_path / "shared.jsonl"
        argv = ["predict", model_dir, "--input", sentences_csv, "--output", output, *extra]
        code, _, err = cli(capsys, *argv)
        assert code == 0, err
        for row, want in zip(read_rows(output), read_rows(alone), strict=True):
            assert list(row["probabilities"].values()) == pytest.approx(
                list(want["probabilities"].values()), abs=1e-6
            )


# --- bad input ---------------------------------------------------------------------------------


def expect_user_error(capsys, argv, fragment: str) -> None:
    code, _, err = cli(capsys, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fragment in err, err


def test_bad_inputs_are_one_line_errors(runs, sentences_csv, tmp_path, capsys):
    final = runs["final"]["lora_a"]
    out = ["--output", tmp_path / "out.jsonl"]
    expect_user_error(
        capsys,
        ["predict", final, "--input", tmp_path / "nope.csv", *out],
        "--input: file not found",
    )
    wrong = write_csv(tmp_path / "wrong.csv", [{"sentence": "good film"}])
    expect_user_error(capsys, ["predict", final, "--input", wrong, *out], "missing column 'text'")
    expect_user_error(
        capsys,
        ["predict", final, "--input", sentences_csv, *out, "--use", "nope"],
        "--use: no adapter named 'nope' (loaded: default)",
    )
    expect_user_error(
        capsys,
        ["predict", final, "--input", sentences_csv, *out, "--adapter", f"x={tmp_path}"],
        "not an adapter folder",
    )
    expect_user_error(
        capsys,
        ["predict", final, "--input", sentences_csv, *out, "--batch-size", "0"],
        "--batch-size: must be > 0",
    )
    for option, fragment in [
        (["--quantize", "foo"], "--quantize: 'foo' is not one of no, int8"),
        (["--pad-to-multiple-of", "0"], "--pad-to-multiple-of: must be > 0, got 0"),
        (["--quantize", "int8", "--precision", "bf16"], "computes in float32; drop --precision"),
        (["--precision", "fp16"], "--precision: fp16 needs CUDA"),
    ]:
        expect_user_error(
            capsys, ["predict", final, "--input", sentences_csv, *out, *option], fragment
        )
    expect_user_error(
        capsys,
        ["predict", runs["final"]["ner"], "--input", sentences_csv, *out, "task=classification"],
        "has a token-classification head",
    )
    assert not (tmp_path / "out.jsonl").exists()


def test_a_folder_cannot_turn_on_its_own_remote_code(tiny_bert, tmp_path):
    """A model folder from someone else whose trainer_config.yaml asks for
    trust_remote_code runs none of its code unless the user's own override asks."""
    import shutil

    import yaml

    from trainer.model.saved import RUN_CONFIG_NAME, SavedModel

    folder = tmp_path / "someones_model"
    shutil.copytree(tiny_bert, folder)
    planted = {"task": "classification", "model": {"trust_remote_code": True}}
    (folder / RUN_CONFIG_NAME).write_text(yaml.safe_dump(planted))
    saved = SavedModel.read(folder)
    assert saved.run_config().model.trust_remote_code is False
    assert saved.run_config(["model.trust_remote_code=true"]).model.trust_remote_code is True
