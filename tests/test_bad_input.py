"""Bad input of every class through the `trainer` command (issue 16, "Bad input"): other
encodings and byte-order marks, directories where files belong and files where folders
belong, hub ids that can't be reached, values beyond what the model takes, number formats,
packages a key needs, unwritable folders, seeds out of range, two runs into one output_dir.
Each is one `error:` line naming the key, file or row, exit 2, and nothing already written
is touched."""

from __future__ import annotations

import codecs
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import reset_accelerate, sentiment_rows, write_csv
from test_cli_errors import expect_user_error, run_cli, snapshot
from test_run_dir_guards import hold_lock

from launch.guard import check_train_environment
from launch.profiles import PROFILE_DIR, load_profile
from trainer.config import DataConfig, load_config
from trainer.data.read import LABELLED_TEXT, TAGGED_WORDS, TEXT, read_split
from trainer.data.stream import RowStream
from trainer.errors import UserError
from trainer.yaml_sections import read_yaml

LATIN1 = "café bien .".encode("latin-1")  # é is 0xe9 in Latin-1, not valid UTF-8 alone


# --- encodings and byte-order marks ---------------------------------------------------------


def test_a_config_with_a_utf8_bom_reads_as_without(run_config, tmp_path):
    plain = run_config("classification")
    with_bom = tmp_path / "bom.yaml"
    with_bom.write_bytes(codecs.BOM_UTF8 + plain.read_bytes())
    assert read_yaml(with_bom) == read_yaml(plain)
    assert load_config(with_bom) == load_config(plain)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_config_in_utf16_or_32_is_refused(capsys, run_config, tmp_path, encoding):
    path = tmp_path / "wide.yaml"
    path.write_bytes(run_config("classification").read_text().encode(encoding))
    expect_user_error(
        capsys, ["train", path], f"config file {path}: {encoding.upper()} text", "UTF-8"
    )


def test_a_config_with_latin1_bytes_names_the_line(capsys, run_config, tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(run_config("classification").read_bytes() + b"# " + LATIN1 + b"\n")
    lines = len(path.read_bytes().splitlines())
    expect_user_error(
        capsys, ["train", path], f"config file {path} line {lines}: not UTF-8", "byte 0xe9"
    )


def _with_bom(source: Path, target: Path) -> Path:
    target.write_bytes(codecs.BOM_UTF8 + source.read_bytes())
    return target


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("sentiment_train.csv", LABELLED_TEXT),
        ("ner_train.jsonl", TAGGED_WORDS),
        ("text.txt", TEXT),
    ],
)
def test_data_files_with_a_utf8_bom_read_as_without(data_dir, tmp_path, name, rows):
    plain = read_split(str(data_dir / name), "data.train", rows, DataConfig())
    marked = _with_bom(data_dir / name, tmp_path / name)
    read = read_split(str(marked), "data.train", rows, DataConfig())
    assert read.rows == plain.rows  # csv: the header is 'text', not '\ufefftext'
    assert "\ufeff" not in repr(read.rows[0])


def test_a_streamed_text_file_with_a_bom_starts_with_its_text(data_dir, tmp_path):
    marked = _with_bom(data_dir / "text.txt", tmp_path / "text.txt")
    stream = RowStream(str(marked), "data.train", DataConfig(), 0, 1, 0)
    first = next(stream.texts())
    assert first == (data_dir / "text.txt").read_text().splitlines()[0]


def test_a_streamed_file_in_another_encoding_names_the_key_and_file(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"good film\n" + LATIN1 + b"\n")
    (tmp_path / "wide.txt").write_bytes("good film\n".encode("utf-16"))
    stream = RowStream(str(tmp_path / "latin.txt"), "data.train", DataConfig(), 0, 1, 0)
    texts = stream.texts()
    assert next(texts) == "good film"
    with pytest.raises(UserError, match=r"^data.train: latin.txt at byte 10: not UTF-8 text$"):
        next(texts)
    stream = RowStream(str(tmp_path / "wide.txt"), "data.train", DataConfig(), 0, 1, 0)
    with pytest.raises(UserError, match=r"^data.train: wide.txt: UTF-16 text \(byte-order mark"):
        next(stream.texts())


def test_a_bad_byte_met_mid_run_while_streaming_is_an_error_line_of_its_own(
    capsys, run_config, data_dir, tmp_path
):
    lines = (data_dir / "text.txt").read_bytes().splitlines(keepends=True)
    path = tmp_path / "t.txt"
    path.write_bytes(lines[0] + LATIN1 + b"\n" + b"".join(lines[1:]))
    config = run_config("mlm", data={"train": str(path), "streaming": True}, train={"max_steps": 4})
    code, _, err = run_cli(capsys, "train", config)
    assert code == 2 and "Traceback" not in err
    at = len(lines[0])
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [f"error: data.train: t.txt at byte {at}: not UTF-8 text"]  # line start


def test_a_csv_with_latin1_bytes_names_the_file_and_line(capsys, run_config, data_dir, tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes((data_dir / "sentiment_train.csv").read_bytes() + LATIN1 + b",positive\n")
    lines = len(path.read_bytes().splitlines())
    config = run_config("classification", data={"train": str(path)})
    expect_user_error(
        capsys,
        ["train", config],
        f"data.train: latin.csv line {lines}: not UTF-8 text (byte 0xe9 after 3 characters)",
    )


@pytest.mark.parametrize(
    ("name", "line", "rows"),
    [
        ("t.jsonl", b'{"tokens": ["' + LATIN1 + b'"], "tags": ["O"]}\n', TAGGED_WORDS),
        ("t.txt", LATIN1 + b"\n", TEXT),
        ("t.conll", LATIN1.split()[0] + b" O\n", TAGGED_WORDS),
    ],
)
def test_other_data_files_with_latin1_bytes_name_the_line(tmp_path, name, line, rows):
    path = tmp_path / name
    good = b'{"tokens": ["a"], "tags": ["O"]}\n' if name.endswith("jsonl") else b"a O\n\n"
    path.write_bytes(good + line)
    bad_line = len(good.splitlines()) + 1
    with pytest.raises(UserError, match=rf"^data.train: {name} line {bad_line}: not UTF-8 text"):
        read_split(str(path), "data.train", rows, DataConfig())


def test_a_utf16_data_file_is_refused_with_or_without_its_bom(tmp_path):
    text = "text,label\ngood film .,positive\n"
    (tmp_path / "bom.csv").write_bytes(text.encode("utf-16"))
    (tmp_path / "nobom.csv").write_bytes(text.encode("utf-16-le"))
    with pytest.raises(UserError, match=r"^data.train: bom.csv: UTF-16 text \(byte-order mark\)"):
        read_split(str(tmp_path / "bom.csv"), "data.train", LABELLED_TEXT, DataConfig())
    with pytest.raises(UserError, match=r"^data.train: nobom.csv line 1: holds NUL bytes"):
        read_split(str(tmp_path / "nobom.csv"), "data.train", LABELLED_TEXT, DataConfig())


def test_a_synonym_table_with_latin1_bytes_names_the_line(tmp_path):
    from trainer.data.augment import read_synonyms

    path = tmp_path / "syn.tsv"
    path.write_bytes(b"good\tfine,nice\n" + LATIN1.split()[0] + b"\tcoffee\n")
    with pytest.raises(UserError, match=r"^data.augment.synonyms: syn.tsv line 2: not UTF-8"):
        read_synonyms(str(path))


def test_predict_input_with_latin1_bytes_names_the_line(capsys, tiny_bert, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"good film\n" + LATIN1 + b"\n")
    argv = ["predict", tiny_bert, "--input", path, "--output", tmp_path / "out.jsonl"]
    expect_user_error(capsys, argv, "--input: in.txt line 2: not UTF-8 text")
    assert not (tmp_path / "out.jsonl").exists()


# --- directories where files belong, files where folders belong, hub ids ------------------


def test_data_train_that_is_a_directory(capsys, run_config, tmp_path):
    config = run_config("classification", data={"train": str(tmp_path)})
    expect_user_error(capsys, ["train", config], f"data.train: {tmp_path} is a directory")


def test_a_bare_folder_name_is_still_left_to_datasets(tmp_path, monkeypatch):
    from trainer.data.read import source_files

    (tmp_path / "reviews").mkdir()  # `datasets.load_dataset("reviews")` reads such a folder
    monkeypatch.chdir(tmp_path)
    assert source_files("reviews", "data.train") is None
    with pytest.raises(UserError, match=r"^data.train: ./reviews is a directory"):
        source_files("./reviews", "data.train")


def test_config_that_is_a_directory(capsys, tmp_path):
    expect_user_error(capsys, ["train", tmp_path], f"config file {tmp_path} is a directory")


def test_predict_input_that_is_a_directory(capsys, tiny_bert, tmp_path):
    argv = ["predict", tiny_bert, "--input", tmp_path, "--output", tmp_path / "out.jsonl"]
    expect_user_error(capsys, argv, f"--input: {tmp_path} is a directory")


def test_predict_output_that_is_a_directory(capsys, tiny_bert, data_dir, tmp_path):
    argv = ["predict", tiny_bert, "--input", data_dir / "text.txt", "--output", tmp_path]
    expect_user_error(capsys, argv, f"--output: {tmp_path} is a directory")


def test_evaluate_data_that_is_a_directory(capsys, tiny_bert, tmp_path):
    expect_user_error(
        capsys, ["evaluate", tiny_bert, "--data", tmp_path], f"--data: {tmp_path} is a directory"
    )


def test_evaluate_model_dir_that_is_a_file(capsys, data_dir):
    model = data_dir / "text.txt"
    expect_user_error(
        capsys,
        ["evaluate", model, "--data", data_dir / "text.txt"],
        f"MODEL_DIR: {model} is not a model folder",
    )


@pytest.mark.parametrize(
    ("section", "key", "fragment"),
    [
        ("model", "name_or_path", "is a file; name the model folder"),
        ("model", "tokenizer", "is a file; name the tokenizer folder"),
        ("top", "output_dir", "is a file, not a directory"),
        ("data", "cache_dir", "is a file, not a directory"),
    ],
)
def test_a_file_where_a_folder_belongs(capsys, run_config, tmp_path, section, key, fragment):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    if section == "top":
        config = run_config("classification", **{key: str(a_file)})
    else:
        config = run_config("classification", **{section: {key: str(a_file)}})
    dotted = key if section == "top" else f"{section}.{key}"
    expect_user_error(capsys, ["train", config], f"{dotted}: {a_file} {fragment}")
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize("key", ["name_or_path", "tokenizer"])
def test_a_hub_id_that_is_neither_local_nor_reachable(capsys, run_config, monkeypatch, key):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = run_config("classification", model={key: "no-such-org/no-such-model"})
    expect_user_error(
        capsys,
        ["train", config],
        f"model.{key}: 'no-such-org/no-such-model' is neither a local folder nor reachable "
        "on the hub",
    )


# --- values beyond what the model takes, checked before anything is tokenized --------------


@pytest.mark.parametrize("task", ["clm", "classification"])
def test_max_length_beyond_the_positions_is_refused_before_tokenizing(
    capsys, run_config, tmp_path, task
):
    cache = tmp_path / "cache"
    config = run_config(task, data={"max_length": 300, "cache_dir": str(cache)})
    expect_user_error(
        capsys,
        ["train", config],
        "data.max_length: 300 is more than the 256 positions of",
        "lower it to 256 or less",
    )
    assert not any(cache.glob("*/meta.json"))  # nothing was tokenized
    assert not (tmp_path / "run").exists()


def test_the_position_limit_of_each_kind_of_position_embedding():
    from transformers import DebertaV2Config, GPT2Config, LlamaConfig, RobertaConfig

    from trainer.model.load import position_limit

    assert position_limit(GPT2Config(n_positions=256)) == 256
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(LlamaConfig(max_position_embeddings=2048)) is None  # rotary
    assert position_limit(DebertaV2Config(position_biased_input=False)) is None  # relative


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_16_bit_lora_base_without_matching_autocast_is_refused(capsys, run_config, dtype):
    config = run_config("classification", model={"dtype": dtype}, peft={"method": "lora"})
    expect_user_error(
        capsys, ["train", config], f"model.dtype: a {dtype} LoRA base needs train.precision"
    )


# --- number formats --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=1e-5", 1e-5),  # YAML 1.1 reads these as strings
        ("train.lr=5E-5", 5e-5),
        ("train.lr=.5e-3", 5e-4),
        ("train.lr=+1e-3", 1e-3),
        ("train.lr=1_000e-6", 1e-3),
        ("train.max_steps=1_000", 1000),
        ("train.max_steps=+3", 3),
        ("train.max_steps=1e3", 1000),
        ("train.max_steps=3.0", 3),
        ("train.max_steps=0x10", 16),
    ],
)
def test_numbers_in_overrides_in_their_usual_forms(run_config, override, expected):
    key, _ = override.split("=")
    cfg = load_config(run_config("classification"), [override])
    value = getattr(cfg.train, key.split(".")[1])
    assert value == pytest.approx(expected) and type(value) is type(expected)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=inf", "train.lr: expected a finite number, got inf"),
        ("train.lr=1e400", "train.lr: expected a finite number, got inf"),
        ("train.lr=nan", "train.lr: expected a finite number, got nan"),
        ("train.max_steps=10.5", "train.max_steps: expected an integer, got 10.5"),
        ("train.max_steps=1e400", "train.max_steps: expected an integer, got '1e400'"),
    ],
)
def test_numbers_that_are_not_usable_are_one_line(capsys, run_config, override, message):
    expect_user_error(capsys, ["train", run_config("classification"), override], message)


# --- seeds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_a_seed_outside_numpys_range_is_refused_at_validation(capsys, run_config, seed):
    expect_user_error(
        capsys,
        ["train", run_config("classification"), f"train.seed={seed}"],
        f"train.seed: must be in [0, 2**32 - 1] (numpy's seed range), got {seed}",
    )


def test_the_largest_seed_numpy_takes_is_accepted(run_config):
    assert load_config(run_config("classification"), [f"train.seed={2**32 - 1}"])


# --- packages a key needs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "module", "message"),
    [
        ("model.attn_implementation=flash_attention_2", "flash_attn", "pip install flash-attn"),
        (
            "model.attn_implementation=flash_attention_3",
            "flash_attn_interface",
            "pip install flash-attn-3",
        ),
        ("peft.method=qlora", "bitsandbytes", "peft.method: qlora needs the bitsandbytes"),
        ("peft.method=lora", "peft", "peft.method: lora needs the peft package"),
        (
            "log.trackers=[tensorboard]",
            "tensorboard tensorboardX",  # either one writes the events
            "log.trackers: tensorboard is not installed; pip install 'steadytrain[tensorboard]'",
        ),
    ],
)
def test_a_key_whose_package_is_not_installed(
    capsys, run_config, monkeypatch, override, module, message
):
    for name in module.split():
        monkeypatch.setitem(sys.modules, name, None)  # what find_spec sees of a missing one
    expect_user_error(
        capsys, ["train", run_config("classification"), override], message, "not installed"
    )


def test_deepspeed_not_installed(monkeypatch, run_config):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(UserError, match=r"backend: deepspeed needs the deepspeed package"):
        load_profile(str(PROFILE_DIR / "8gpu-zero2.yaml"))
    cfg = load_config(run_config("classification"))
    with pytest.raises(
        UserError, match=r"ACCELERATE_USE_DEEPSPEED=true .*\(pip install deepspeed\)"
    ):
        check_train_environment(cfg, {"ACCELERATE_USE_DEEPSPEED": "true"})


# --- folders that can't be written -----------------------------------------------------------
# Tests run as root, for whom chmod does not stop writes: a parent that is a regular file,
# and /proc (where even root can't create a directory), stand in for an unwritable parent.


@pytest.mark.parametrize("key", ["output_dir", "data.cache_dir"])
def test_a_folder_whose_parent_is_a_file(capsys, run_config, tmp_path, key):
    parent = tmp_path / "a-file"
    parent.write_text("x")
    argv = ["train", run_config("classification"), f"{key}={parent / 'sub'}"]
    expect_user_error(capsys, argv, f"{key}: can't create {parent / 'sub'}: {parent} is a file")


@pytest.mark.parametrize(
    ("key", "fragment"),
    [("output_dir", "output_dir: can't write to"), ("data.cache_dir", "data.cache_dir: can't")],
)
def test_a_folder_that_even_root_cannot_create(capsys, run_config, key, fragment):
    argv = ["train", run_config("classification"), f"{key}=/proc/trainer-test-{os.getpid()}"]
    expect_user_error(capsys, argv, fragment, "/proc/trainer-test-")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_folder_under_a_read_only_parent(capsys, run_config, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o500)
    argv = ["train", run_config("classification"), f"output_dir={parent / 'run'}"]
    expect_user_error(capsys, argv, f"output_dir: can't write to {parent}")


# --- nothing already written is touched ------------------------------------------------------


def test_a_second_run_into_a_live_runs_output_dir_touches_nothing(capsys, run_config):
    config = run_config("classification")
    run_dir = config.parent / "run"
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"weights")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    holder = hold_lock(run_dir)  # the first run, alive, in another process
    try:
        before = snapshot(run_dir)
        expect_user_error(
            capsys, ["train", config], f"output_dir: {run_dir} is in use by another run"
        )
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def resumable(capsys, run_config, tmp_path):
    """A run stopped after its checkpoint at step 2 (final/ and its results removed), whose
    training file is a copy that a test may spoil."""
    train = write_csv(tmp_path / "train.csv", sentiment_rows(32, seed=9))
    config = run_config(
        "classification",
        data={"train": str(train), "validation": None},
        train={"max_steps": 2},
        checkpoint={"every_steps": 2},
        eval={"every_steps": 0},
    )
    code, _, err = run_cli(capsys, "train", config)
    assert code == 0, err
    reset_accelerate()
    run_dir = tmp_path / "run"
    for name in ("final", "best"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / "eval_results.json").unlink(missing_ok=True)
    assert any((run_dir / "checkpoints").iterdir())
    return config, run_dir, train


@pytest.mark.parametrize("spoil", ["latin1", "bom-utf16"])
def test_a_resumed_run_with_a_bad_data_file_touches_nothing(capsys, resumable, spoil):
    config, run_dir, train = resumable
    if spoil == "latin1":
        train.write_bytes(train.read_bytes() + LATIN1 + b",positive\n")
    else:
        train.write_bytes(train.read_text().encode("utf-16"))
    before = snapshot(run_dir)
    expect_user_error(capsys, ["train", config], "data.train: train.csv")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("problem", ["latin1 data", "max_length"])
def test_a_started_over_run_with_a_bad_input_keeps_its_files_in_place(
    capsys, run_config, tmp_path, data_dir, problem
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # no checkpoint
    before = snapshot(run_dir)
    if problem == "max_length":
        config, message = run_config("clm", data={"max_length": 300}), "data.max_length: 300"
    else:
        train = tmp_path / "train.txt"
        train.write_bytes((data_dir / "text.txt").read_bytes() + LATIN1 + b"\n")
        config, message = run_config("clm", data={"train": str(train)}), "data.train: "
    code, _, err = run_cli(capsys, "train", config)
    assert code == 2 and "Traceback" not in err
    assert "starting over" in err  # what it would have done
    assert err.splitlines()[-1].startswith(f"error: {message}")
    assert snapshot(run_dir) == before  # not renamed to metrics.jsonl.previous-*
