"""Bad input through the `trainer` command: exit code 2, one `error:` line naming the key,
file or row, no traceback; and an earlier run's results are never overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_csv, write_jsonl

from trainer.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_user_error(capsys, argv, *fragments: str) -> str:
    """Run the CLI and check the one-line error contract; returns the message."""
    code, _, err = run_cli(capsys, *argv)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- config problems (found before anything heavy is imported) ------------------------------


def test_misspelled_key(capsys, run_config):
    config = run_config("classification")
    expect_user_error(
        capsys,
        ["train", config, "train.learning_rate=1e-3"],
        "unknown key 'train.learning_rate'",
        "did you mean",
    )


def test_misspelled_key_in_the_file(capsys, run_config):
    config = run_config("classification", trian={"lr": 1e-3})
    expect_user_error(capsys, ["train", config], "unknown key 'trian'", "did you mean 'train'")


def test_wrong_type(capsys, run_config):
    config = run_config("classification")
    expect_user_error(
        capsys,
        ["train", config, "train.epochs=two"],
        "train.epochs: expected an integer, got 'two'",
    )


def test_several_problems_in_one_line(capsys, run_config):
    config = run_config("classification")
    message = expect_user_error(
        capsys, ["train", config, "train.lr=-1", "data.max_length=0", "task=ner"]
    )
    assert "train.lr" in message and "data.max_length" in message and "task" in message


def test_missing_config_file(capsys, tmp_path):
    expect_user_error(
        capsys, ["train", tmp_path / "nope.yaml"], "config file not found", "nope.yaml"
    )


def test_global_batch_that_does_not_divide(capsys, run_config, monkeypatch):
    config = run_config("classification")
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it, checked before anything starts
    expect_user_error(
        capsys,
        ["train", config, "train.global_batch_size=10", "train.micro_batch_size=4"],
        "train.global_batch_size: 10 is not divisible by the 3 processes",
    )


def test_zero_micro_batch_is_a_user_error(capsys, run_config):
    config = run_config("classification")
    expect_user_error(
        capsys, ["train", config, "train.micro_batch_size=0"], "train.micro_batch_size: must be > 0"
    )


# --- data and model problems ---------------------------------------------------------------


def test_missing_data_file(capsys, run_config, tmp_path):
    missing = tmp_path / "absent.csv"
    config = run_config("classification", data={"train": str(missing)})
    expect_user_error(capsys, ["train", config], "data.train", str(missing))


def test_unreadable_jsonl_row(capsys, run_config, tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps({"tokens": ["Alice", "visited", "Paris"], "tags": ["B-PER", "O", "B-LOC"]})
    path.write_text(f'{good}\n{good}\n{good}\n{{"tokens": ["Bob"\n{good}\n')
    config = run_config("token-classification", data={"train": str(path)})
    expect_user_error(
        capsys, ["train", config], "data.train", "broken.jsonl line 4", "not valid JSON"
    )


def test_empty_text_names_the_row(capsys, run_config, tmp_path):
    rows = [{"text": "good film .", "label": "positive"} for _ in range(5)]
    rows[2]["text"] = ""
    path = write_csv(tmp_path / "holes.csv", rows)
    config = run_config("classification", data={"train": str(path)})
    expect_user_error(capsys, ["train", config], "data.train", "holes.csv row 3", "empty text")


def test_unknown_label_in_validation(capsys, run_config, tmp_path):
    rows = [
        {"text": "good film .", "label": "positive"},
        {"text": "meh film .", "label": "neutral"},
    ]
    path = write_csv(tmp_path / "val.csv", rows)
    config = run_config("classification", data={"validation": str(path)})
    expect_user_error(
        capsys, ["train", config], "data.validation", "val.csv row 2", "unknown label 'neutral'"
    )


def test_unknown_tag_in_ner_validation(capsys, run_config, tmp_path):
    path = write_jsonl(
        tmp_path / "val.jsonl",
        [
            {"tokens": ["Alice"], "tags": ["B-PER"]},
            {"tokens": ["the", "Moon"], "tags": ["O", "B-SPACE"]},
        ],
    )
    config = run_config("token-classification", data={"validation": str(path)})
    expect_user_error(capsys, ["train", config], "val.jsonl line 2", "unknown label 'B-SPACE'")


def test_missing_column(capsys, run_config):
    config = run_config("classification", data={"text_column": "review"})
    expect_user_error(
        capsys,
        ["train", config],
        "data.train",
        "row 1",
        "missing column 'review'",
        "columns: text, label",
        "; set data.text_column=text",
    )


def test_missing_columns_suggest_the_ones_meant(capsys, run_config, tmp_path):
    """A CSV of reviews: the text is the longest value, the label the label-like name."""
    rows = [("A long review of the film goes here", "positive"), ("bad", "negative")]
    write_csv(tmp_path / "reviews.csv", [{"review": r, "sentiment": s} for r, s in rows])
    config = run_config("classification", data={"train": str(tmp_path / "reviews.csv")})
    expect_user_error(capsys, ["train", config], "; set data.text_column=review")
    config = run_config(
        "classification",
        data={"train": str(tmp_path / "reviews.csv"), "text_column": "review"},
    )
    expect_user_error(capsys, ["train", config], "; set data.label_column=sentiment")


def test_model_folder_that_does_not_exist(capsys, run_config, tmp_path):
    missing = tmp_path / "no-such-model"
    config = run_config("classification", model={"name_or_path": str(missing)})
    expect_user_error(capsys, ["train", config], "model.name_or_path", str(missing))


def test_folder_without_config_json_is_not_a_model(capsys, run_config, tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    config = run_config("classification", model={"name_or_path": str(folder)})
    expect_user_error(capsys, ["train", config], "model.name_or_path", "no config.json")


def test_unknown_config_override(capsys, run_config):
    config = run_config("classification", model={"config_overrides": {"num_layerz": 1}})
    expect_user_error(capsys, ["train", config], "model.config_overrides", "'num_layerz'")


def test_global_batch_larger_than_the_data(capsys, run_config):
    config = run_config("classification", train={"global_batch_size": 512, "micro_batch_size": 4})
    expect_user_error(capsys, ["train", config], "train.global_batch_size: 512 is more than")


def test_failed_run_writes_nothing(capsys, run_config, tmp_path):
    config = run_config("classification", data={"text_column": "review"})
    expect_user_error(capsys, ["train", config])
    assert not (tmp_path / "run").exists()


def test_evaluate_without_a_model_folder(capsys, tmp_path, data_dir):
    expect_user_error(
        capsys,
        ["evaluate", tmp_path, "--data", data_dir / "sentiment_validation.csv"],
        "is not a model folder",
    )


# --- nothing already written is lost -------------------------------------------------------


def snapshot(folder) -> dict:
    return {
        path.relative_to(folder): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_finished_run_is_left_alone(capsys, run_config, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "model.safetensors").write_bytes(b"weights")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run_dir / "eval_results.json").write_text('{"f1": 0.9}')
    before = snapshot(run_dir)
    code, out, err = run_cli(capsys, "train", run_config("classification"))
    assert code == 0, err
    assert "already finished" in out
    assert snapshot(run_dir) == before


def test_a_finished_run_started_with_other_values_says_which(capsys, run_config, tmp_path):
    """Raising the steps of a finished run does not silently train nothing: the keys are
    listed; train.resume=never trains again with the finished run's files kept aside."""
    config = run_config("classification", train={"max_steps": 2})
    assert run_cli(capsys, "train", config)[0] == 0
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    assert "already finished" in run_cli(capsys, "train", config)[1], "unchanged: exit 0"
    expect_user_error(
        capsys,
        ["train", config, "train.max_steps=4", "train.lr=0.5"],
        f"output_dir: {run_dir} holds a finished run trained with other values: ",
        "train.lr (then 0.001, now 0.5), train.max_steps (then 2, now 4)",
        "train.resume=never",
    )
    assert snapshot(run_dir) == before
    code, _, err = run_cli(capsys, "train", config, "train.max_steps=4", "train.resume=never")
    assert code == 0, err
    (kept,) = run_dir.glob("final.previous-*")
    assert snapshot(kept) == {
        path.relative_to("final"): value
        for path, value in before.items()
        if path.parts[0] == "final"
    }
    assert json.loads((run_dir / "eval_results.json").read_text())["steps"] == 4


def test_unfinished_run_is_not_overwritten(capsys, run_config, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n')
    # committed once and damaged now (a run stopped before any checkpoint starts over)
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    before = snapshot(run_dir)
    expect_user_error(capsys, ["train", run_config("classification")], "output_dir", str(run_dir))
    assert snapshot(run_dir) == before


# --- the real entry point, in its own process ----------------------------------------------


def test_console_entry_point_exits_2_without_traceback(run_config):
    config = run_config("classification")
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(config), "trian.lr=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: unknown key 'trian' (did you mean 'train'?)"]
    assert result.stdout == ""


@pytest.mark.slow
def test_console_entry_point_data_error_in_its_own_process(run_config, tmp_path):
    # Imports torch, transformers and accelerate first (about 10 s), so marked slow.
    rows = [{"text": "fine .", "label": "positive"}, {"text": " ", "label": "negative"}]
    config = run_config("classification", data={"train": str(write_csv(tmp_path / "t.csv", rows))})
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: data.train: t.csv row 2: empty text in column 'text'"
    ]


def test_keys_lists_every_config_key(capsys):
    from trainer.config import all_keys

    code, out, _ = run_cli(capsys, "keys")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == list(all_keys())
    assert "train.global_batch_size" in listed


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`trainer keys | head -1`: the pipe closes under the writer."""
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer", "keys"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # gone before the first line: every write finds no reader
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and "Traceback" not in stderr, stderr


def test_a_head_drawn_at_random_is_said_in_train_and_evaluate(capsys, run_config, tmp_path):
    """all-MiniLM-L6-v2 ships no MLM head: MLM on it starts from (and scores) noise."""
    from transformers import AutoModel, AutoTokenizer

    source = Path(yaml.safe_load(Path(run_config("mlm")).read_text())["model"]["name_or_path"])
    headless = tmp_path / "headless"
    AutoModel.from_pretrained(source).save_pretrained(headless)  # BertModel: no cls.*
    AutoTokenizer.from_pretrained(source).save_pretrained(headless)
    config = run_config("mlm", model={"name_or_path": str(headless)}, train={"max_steps": 1})
    code, _, err = run_cli(capsys, "train", config)
    warning = f"warning: model.name_or_path: {headless} has no trained mlm head (cls.predictions"
    assert code == 0 and err.count(warning) == 1, err
    data = yaml.safe_load(Path(config).read_text())["data"]["validation"]
    code, _, err = run_cli(capsys, "evaluate", headless, "--data", data, "task=mlm")
    assert code == 0 and f"warning: MODEL_DIR: {headless} has no trained mlm head" in err, err
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "run" / "final", "--data", data)
    assert code == 0 and "warning" not in err, "the trained head is no longer random"
    code, _, err = run_cli(
        capsys, "train", run_config("classification", output_dir=str(tmp_path / "c"))
    )
    assert code == 0 and "has no trained" not in err, "a new classifier is what fine-tuning is"
