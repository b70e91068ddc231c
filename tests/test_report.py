"""`trainer report` on tiny runs: valid PNGs for every curve the run has, the confusion
matrix and per-class F1 for classification only, report.md with each image and the final
metrics exactly as eval_results.json has them; an unfinished run still gets its loss curve;
a bad RUN_DIR is a one-line error."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_run_config, reset_accelerate

from trainer.cli import main
from trainer.commands.report import training_seconds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CURVES = ("loss.png", "lr.png", "throughput.png")
CLASSIFICATION_ONLY = ("confusion_matrix.png", "f1_per_class.png")


def cli(*argv) -> int:
    """`trainer ...` in this process, as a fresh process would see accelerate's state."""
    reset_accelerate()
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models_by_task, data_dir):
    """`finished(task)`: a tiny run of the task trained to the end, once per module."""
    runs: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in runs:
            folder = tmp_path_factory.mktemp(f"report-{task}")
            config = make_run_config(
                folder, task, tiny_models_by_task, data_dir, eval={"every_steps": 8}
            )
            assert cli("train", config) == 0
            runs[task] = folder / "run"
        return runs[task]

    return get


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))  # a drawn figure, not an empty canvas


def written_numbers(results_file: Path) -> dict[str, str]:
    """The top-level numbers of eval_results.json exactly as the file spells them."""
    text = results_file.read_text()
    return dict(re.findall(r'^  "(\w+)": (-?[0-9][0-9.eE+-]*),?$', text, flags=re.M))


def report_for(capsys, run_dir: Path, *options) -> tuple[Path, str]:
    """Run `trainer report`; returns report.md's path (the last stdout line) and its text."""
    capsys.readouterr()
    assert cli("report", run_dir, *options) == 0
    printed = Path(capsys.readouterr().out.splitlines()[-1])
    return printed, printed.read_text()


def test_classification_report(capsys, finished):
    run_dir = finished("classification")
    report, text = report_for(capsys, run_dir)
    assert report == run_dir / "report" / "report.md"
    for name in CURVES + CLASSIFICATION_ONLY:
        assert_valid_png(report.parent / name)
        assert f"]({name})" in text, name  # embedded with a relative link
    numbers = written_numbers(run_dir / "eval_results.json")
    assert {"loss", "accuracy", "f1", "precision", "recall", "best_step"} <= set(numbers)
    for key, value in numbers.items():
        assert f"| {key} | {value} |" in text, (key, value)
    assert "Finished: " in text
    assert "| task | `classification` |" in text
    assert "| `train.lr` | `0.001` |" in text  # the key settings table
    assert "```yaml\ntask: classification\n" in text  # and the whole config.yaml


def test_mlm_report_has_curves_but_no_classification_plots(capsys, finished):
    run_dir = finished("mlm")
    report, text = report_for(capsys, run_dir)
    for name in CURVES:
        assert_valid_png(report.parent / name)
        assert f"]({name})" in text
    for name in CLASSIFICATION_ONLY:
        assert not (report.parent / name).exists()
        assert name not in text
    numbers = written_numbers(run_dir / "eval_results.json")
    assert "perplexity" in numbers
    assert f"| perplexity | {numbers['perplexity']} |" in text


def test_unfinished_run_still_gets_its_loss_curve(capsys, finished, tmp_path):
    """metrics.jsonl only, its last line torn as by a kill mid-write: the curves are drawn,
    the parts that need eval_results.json are left out and the report says so."""
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (finished("classification") / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:12]) + '\n{"step": 13, "lo')
    report, text = report_for(capsys, partial, "--out", tmp_path / "elsewhere")
    assert report == tmp_path / "elsewhere" / "report.md"
    assert_valid_png(report.parent / "loss.png")
    assert "](loss.png)" in text
    for name in CLASSIFICATION_ONLY:
        assert not (report.parent / name).exists()
    assert "Not finished" in text and "no eval_results.json" in text
    assert "Latest evaluation" in text  # the evaluation at step 8, from metrics.jsonl
    assert not (partial / "report").exists()  # --out was honoured


@pytest.mark.parametrize("make", ["missing", "no-metrics"])
def test_bad_run_dir_is_one_line_error(capsys, tmp_path, make):
    run_dir = tmp_path / "nowhere"
    if make == "no-metrics":
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("task: mlm\n")
    capsys.readouterr()
    assert cli("report", run_dir) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert str(run_dir) in err
    assert "Traceback" not in err


def test_training_clock_adds_up_resumed_segments():
    """Runs from before elapsed_s continued across resumes: each segment's last value."""
    steps = [{"elapsed_s": s} for s in (1.0, 2.0, 3.0, 0.5, 1.5)]
    assert training_seconds(steps) == pytest.approx(4.5)


def test_training_clock_continued_across_a_resume_is_its_last_value():
    steps = [{"elapsed_s": s} for s in (1.0, 2.0, 3.0, 3.5, 4.5)]
    assert training_seconds(steps) == pytest.approx(4.5)


def test_cli_does_not_import_matplotlib():
    """`trainer --help` stays fast: matplotlib is imported by `trainer report` only."""
    code = "import sys, trainer.cli; sys.exit('matplotlib' in sys.modules)"
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO).returncode == 0


def test_report_again_replaces_stale_images(capsys, finished, tmp_path):
    """A report folder reused for another run keeps no image of the first one."""
    out = tmp_path / "report"
    report_for(capsys, finished("classification"), "--out", out)
    assert (out / "confusion_matrix.png").exists()
    shutil.copy(finished("mlm") / "metrics.jsonl", tmp_path / "metrics.jsonl")
    report_for(capsys, tmp_path, "--out", out)
    assert not (out / "confusion_matrix.png").exists()
