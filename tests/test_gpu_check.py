"""`make gpu-check` on a machine without CUDA, and the parts of it that do not need one: no
part is skipped without a row saying why, a part that breaks is a failed row and exit code
1, pytest's JUnit report becomes a row per test, and the results are written whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, gpu_wheels
from benchmarks.gpu_check import Row


def test_without_cuda_every_part_is_a_row_that_says_why(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--no-write", "--budget-s", "60"]) == 0
    printed = capsys.readouterr().out
    for part in ("gpu tests", "GPT-2-124M bf16 training", "trainer predict"):
        assert f"| {part} | skipped | no CUDA |" in printed
    assert "| machine: CUDA | skipped |" in printed
    assert "0 failed" in printed


def test_a_part_that_breaks_is_a_failed_row(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "missing_packages", lambda: [])

    def broken() -> list[Row]:
        raise RuntimeError("CUDA error: out of memory\nmore")

    rows = gpu_check.guarded("predict", (), broken)
    assert rows == [Row("predict", "failed", "RuntimeError: CUDA error: out of memory")]


def test_a_missing_package_skips_what_needs_it_naming_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "missing_packages", lambda: ["deepspeed"])
    rows = gpu_check.guarded("zero", ("deepspeed", "torch"), lambda: [Row("zero", "passed")])
    assert rows == [Row("zero", "skipped", "missing deepspeed (make gpu-wheels)")]


def test_junit_report_becomes_a_row_per_test(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='needs CUDA')\ndef test_later():\n    pass\n"
    )
    report = tmp_path / "report.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    subprocess.run([*command, f"--junitxml={report}", str(tmp_path)], capture_output=True)
    import xml.etree.ElementTree as ET

    rows = {r.check: r for r in map(gpu_check.test_row, ET.parse(report).iter("testcase"))}
    assert rows["test test_sample::test_ok"].status == "passed"
    assert rows["test test_sample::test_bad"].status == "failed"
    assert "one is not two" in rows["test test_sample::test_bad"].detail
    assert rows["test test_sample::test_later"] == Row(
        "test test_sample::test_later", "skipped", "needs CUDA"
    )


def test_results_are_written_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULTS_DIR", tmp_path)
    rows = [Row("a", "passed", "1 s"), Row("b", "skipped", "no CUDA")]
    path = gpu_check.write_results(gpu_check.markdown(rows, 1.0), rows)
    assert "| a | passed | 1 s |" in path.read_text()
    assert path.with_suffix(".json").is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_gpu_wheels_carry_minilm_without_its_weights(tmp_path):
    gpu_wheels.minilm_files(tmp_path / "minilm")
    names = {p.name for p in (tmp_path / "minilm").iterdir()}
    assert {"config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".onnx"))]
    assert sum(p.stat().st_size for p in Path(tmp_path / "minilm").iterdir()) < 2**21


@pytest.mark.slow
def test_every_gpu_test_is_collected_and_skipped_here_saying_why():
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    done = subprocess.run([*command, "tests"], capture_output=True, text=True, cwd=gpu_check.ROOT)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "needs CUDA (make gpu-check runs it on a GPU)" in done.stdout
    assert " passed" not in done.stdout.splitlines()[-1]
