"""Generation at evaluation (eval.generate): the first N validation prompts, exactly as
training rendered them, answered greedily at each evaluation; samples.jsonl cut back on
resume like metrics.jsonl; exact_match / contains; `trainer report` shows the latest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, reset_accelerate
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.cli import main
from trainer.commands.report import samples_section
from trainer.config import DataConfig, build_config
from trainer.data.read import Split
from trainer.errors import UserError
from trainer.run.resume import checkpoint_dir
from trainer.run.samples import answer_scores, normalise, prompts_of
from trainer.tasks.sft import SFT

SFT_DATA = REPO / "data" / "sft"


def head(source: Path, target: Path, count: int) -> Path:
    """The first `count` rows of a shipped data file."""
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:count]))
    return target


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def generate_config(folder: Path, model: Path, **settings) -> list[str]:
    """A few steps on data/sft's first rows, evaluated every 2 steps with eval.generate."""
    folder.mkdir(parents=True, exist_ok=True)
    values = {
        "output_dir": folder / "run",
        "model.name_or_path": model,
        "data.train": head(SFT_DATA / "train.jsonl", folder / "train.jsonl", 64),
        "data.validation": head(SFT_DATA / "validation.jsonl", folder / "validation.jsonl", 8),
        "data.max_length": 96,
        "data.cache_dir": "null",
        "train.max_steps": 4,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.lr": 3e-3,
        "train.warmup_ratio": 0.0,
        "log.every_steps": 1,
        "log.trackers": "[]",
        "eval.every_steps": 2,
        "eval.generate": 2,
        "eval.max_new_tokens": 8,
        "checkpoint.every_steps": 2,
    } | settings
    config = folder / "sft.yaml"
    config.write_text("task: sft\n")
    return [config, *(f"{k}={v}" for k, v in values.items())]


def samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def chat_prompt(tokenizer, row: dict) -> str:
    """The row's turns before its last answer, with the generation prompt: what the model
    saw in training before the answer it is asked for."""
    return tokenizer.apply_chat_template(
        row["messages"][:-1], add_generation_prompt=True, tokenize=False
    )


def greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """A plain transformers greedy answer, stopped at EOS (<|im_end|>)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def generating_run(tmp_path_factory, tiny_llama_chat) -> tuple[list[str], Path]:
    argv = generate_config(tmp_path_factory.mktemp("generate"), tiny_llama_chat)
    assert cli("train", *argv) == 0
    return argv, Path(argv[0]).parent / "run"


# --- the scorer ----------------------------------------------------------------------------


def test_answers_are_compared_normalised():
    assert normalise("  Kiwi\tgrey  fox. ") == "kiwi grey fox"
    assert normalise('"Four!"') == "four"
    assert normalise("a.b") == "a.b"  # punctuation inside stays
    scored = [
        {"generated": "Kiwi grey fox.", "reference": "kiwi grey fox"},  # exact once normalised
        {"generated": "four, I think", "reference": "Four"},  # contains, not exact
        {"generated": "fourteen", "reference": "four"},  # contains (a substring), not exact
        {"generated": "owl", "reference": "yak"},  # neither
        {"generated": "no reference"},  # not scored
    ]
    assert answer_scores(scored) == {"exact_match": 0.25, "contains": 0.75}
    assert answer_scores([{"generated": "x"}]) == {}  # no references: no scores


def test_a_pair_prompt_is_the_prompt_text_and_a_dropped_row_gives_none(tiny_llama_chat):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    rows = rows_of(SFT_DATA / "pairs_validation.jsonl")[:3]
    long_row = {"prompt": "sort: " + " ".join(["owl"] * 200), "completion": "owl"}
    split = Split("data.validation", [long_row, *rows], ["r0", "r1", "r2", "r3"])
    data = DataConfig(max_length=48, truncation="drop")
    got = prompts_of(split, SFT, tokenizer, data, 2)
    assert [(p.text, p.reference) for p in got] == [
        (rows[0]["prompt"], rows[0]["completion"]),
        (rows[1]["prompt"], rows[1]["completion"]),
    ]
    assert got[0].ids == tokenizer(rows[0]["prompt"])["input_ids"]
    # keep_end: the long row's prompt keeps its end, as training kept it
    kept = prompts_of(split, SFT, tokenizer, DataConfig(max_length=48), 1)[0]
    answer = tokenizer("owl<|im_end|>")["input_ids"]
    assert len(kept.ids) == 48 - len(answer) and kept.reference == "owl"


# --- in training ---------------------------------------------------------------------------


def test_each_evaluation_writes_n_samples_of_the_training_prompts(generating_run, tiny_llama_chat):
    _, run_dir = generating_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    rows = rows_of(SFT_DATA / "validation.jsonl")[:2]
    written = samples(run_dir)
    assert [s["step"] for s in written] == [2, 2, 4, 4]
    for sample, row in zip(written, rows * 2, strict=True):
        assert sample["prompt"] == chat_prompt(tokenizer, row)
        assert sample["reference"] == row["messages"][-1]["content"]
    evaluations = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    for record in evaluations:
        scores = answer_scores([s for s in written if s["step"] == record["step"]])
        assert record["eval_exact_match"] == scores["exact_match"]
        assert record["eval_contains"] == scores["contains"]
    # the answers are plain greedy generation by the model of that step (final/ is the best)
    best = json.loads((run_dir / "eval_results.json").read_text())["best_step"]
    for sample in [s for s in written if s["step"] == best]:
        assert sample["generated"] == greedy(run_dir / "final", sample["prompt"], 8)
    assert any(s["generated"] for s in written)  # not only empty answers


def test_evaluate_answers_as_evaluation_in_training_did(generating_run, capsys):
    """`trainer evaluate final/ --data V eval.generate=2`: the same prompts and answers as
    the evaluation of the step final/ is, and the same scores."""
    argv, run_dir = generating_run
    data = Path(argv[0]).parent / "validation.jsonl"
    assert cli("evaluate", run_dir / "final", "--data", data, "eval.generate=2") == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    best = json.loads((run_dir / "eval_results.json").read_text())["best_step"]
    expected = [{k: v for k, v in s.items() if k != "step"} for s in samples(run_dir)]
    expected = [e for e, s in zip(expected, samples(run_dir), strict=True) if s["step"] == best]
    assert results["samples"] == expected
    assert results["exact_match"] == answer_scores(expected)["exact_match"]


def test_report_shows_the_latest_samples(generating_run, capsys):
    _, run_dir = generating_run
    assert cli("report", run_dir) == 0
    printed = capsys.readouterr().out
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Samples (step 4)" in report and "## Samples (step 4)" in printed
    table = report.split("## Samples (step 4)")[1].split("##")[0]
    # a prompt keeps its end; newlines shown as ⏎, the template's pipes escaped
    assert r"count: green bee<\|im_end\|>⏎<\|im_start\|>assistant⏎ | two |" in table
    assert table.count("\n| ") == 3  # header and the 2 samples of step 4, not step 2's
    long = samples_section([{"step": 1, "prompt": "p" * 100, "generated": "g" * 100}], 10)
    assert long[-1] == "| …ppppppppp |  | ggggggggg… |"


def test_a_resume_drops_the_samples_after_its_checkpoint(generating_run, tmp_path, capfd):
    """Killed after the evaluation of step 4, before its checkpoint (and mid-append): the
    resumed run cuts samples.jsonl back to step 2 and writes step 4 once, as before."""
    argv, reference = generating_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("metrics.jsonl", "samples.jsonl"):
        shutil.copy(reference / name, run_dir / name)
    with (run_dir / "samples.jsonl").open("a") as handle:
        handle.write('{"step": 4, "prompt": "torn')
    shutil.copytree(checkpoint_dir(reference, 2), checkpoint_dir(run_dir, 2))
    assert cli("train", *argv, f"output_dir={run_dir}") == 0
    assert "(step 2)" in capfd.readouterr().err  # resumed, not started over
    assert not list(run_dir.glob("samples.jsonl.previous-*"))
    assert samples(run_dir) == samples(reference)


def test_clm_continues_validation_texts_and_has_no_scores(tmp_path, tiny_gpt2):
    """CLM rows are raw text: the prompt is the text, continued; there is no answer to
    score, so samples hold no reference and the evaluation no exact_match."""
    texts = [f"the cat sat on mat number {i}" for i in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "validation.txt").write_text("\n".join(texts[:4]) + "\n")
    argv = generate_config(
        tmp_path,
        tiny_gpt2,
        **{"data.train": tmp_path / "train.txt", "data.validation": tmp_path / "validation.txt"},
    )
    Path(argv[0]).write_text("task: clm\n")
    assert cli("train", *argv, "data.max_length=32", "checkpoint.every_steps=0") == 0
    written = samples(tmp_path / "run")
    assert [s["step"] for s in written] == [2, 2, 4, 4]
    assert [s["prompt"] for s in written[:2]] == texts[:2]
    assert all("reference" not in s for s in written)
    assert all("eval_exact_match" not in r for r in read_metrics(tmp_path / "run"))


# --- bad keys --------------------------------------------------------------------------------


def raw(task: str = "sft", **eval_settings) -> dict:
    return {
        "task": task,
        "model": {"name_or_path": "gpt2"},
        "data": {"train": str(SFT_DATA / "train.jsonl"), "validation_split": 0.1},
        "eval": eval_settings,
    }


@pytest.mark.parametrize(
    ("config", "line"),
    [
        (raw("classification", generate=2), "eval.generate: only for task clm or sft"),
        (raw(generate=-1), "eval.generate: must be >= 0, got -1"),
        (raw(generate=2, max_new_tokens=0), "eval.max_new_tokens: must be > 0, got 0"),
        (raw(metric="exact_match"), "eval.metric: exact_match scores generated answers"),
        (raw("clm", generate=2, metric="contains"), "eval.metric: 'contains' is not one of"),
    ],
)
def test_bad_generation_keys_are_refused(config, line):
    with pytest.raises(UserError) as refused:
        build_config(config, world_size=1)
    assert str(refused.value).startswith(line) and ";" not in str(refused.value)


def test_answer_scores_may_pick_the_best_model_while_generating():
    cfg = build_config(raw(generate=2, metric="exact_match"), world_size=1)
    assert cfg.eval_metric == "exact_match"
    no_validation = raw(generate=2)
    del no_validation["data"]["validation_split"]
    with pytest.raises(UserError, match=r"^eval\.generate: needs data\.validation"):
        build_config(no_validation, world_size=1)


def test_a_bad_key_on_the_command_line_is_one_error_line(tmp_path, tiny_llama_chat, capsys):
    argv = generate_config(tmp_path, tiny_llama_chat, **{"eval.generate": -2})
    assert cli("train", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: eval.generate: must be >= 0, got -2"]


# --- on 2 processes --------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_each_answer_their_share_in_order(tmp_path, tiny_llama_chat):
    """3 prompts on 2 processes (2 and 1): gathered back in row order, each the greedy
    answer of the model evaluated."""
    settings = {"eval.generate": 3, "train.max_steps": 2, "checkpoint.every_steps": 0}
    argv = generate_config(tmp_path, tiny_llama_chat, **settings)
    assert cli("launch", *argv[:1], "--cluster", "cpu-2proc", *argv[1:]) == 0
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "run_summary.json").read_text())["processes"] == 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    rows = rows_of(SFT_DATA / "validation.jsonl")[:3]
    written = samples(run_dir)
    assert [s["step"] for s in written] == [2, 2, 2]
    for sample, row in zip(written, rows, strict=True):
        assert sample["reference"] == row["messages"][-1]["content"]
        assert sample["generated"] == greedy(run_dir / "final", sample["prompt"], 8)
    # the third row's system turn was cut by data.max_length: its prompt keeps the end
    assert written[2]["prompt"].endswith(chat_prompt(tokenizer, rows[2])[-60:])
