"""The benchmarks package: every section has the interface the runner calls, the modules
import without a cycle, the cheap sections run their quick form on the tiny models and can
render what they measured, and the runner keeps earlier sections and reports a failure."""

from __future__ import annotations

import ast
import csv
import datetime
import inspect
import json
import sys
import types
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest

from benchmarks import (
    compare_hf_trainer,
    engine,
    hardware,
    hf_reference,
    inference,
    kept,
    optimisations,
    quality,
    run as runner,
    sft,
)
from benchmarks.comparison import SENTIMENT, ratios

PACKAGE = Path(runner.__file__).parent
ALL_SECTIONS = {**runner.SECTIONS, **runner.EXTRA}


def json_round_trip(result: dict) -> dict:
    """The result as the runner stores it (tuples become lists)."""
    return json.loads(json.dumps(result))


@pytest.mark.parametrize("name", ALL_SECTIONS)
def test_section_interface(name):
    module = runner.section_module(name)
    parameters = list(inspect.signature(module.run).parameters.values())
    assert [p.name for p in parameters[:2]] == ["quick", "work_dir"]
    assert all(p.default is not inspect.Parameter.empty for p in parameters[2:])
    assert [*inspect.signature(module.markdown).parameters] == ["result"]
    assert inspect.signature(module.markdown).return_annotation in ("str", str)
    assert module.__doc__ and module.run.__doc__ and module.markdown.__doc__


def test_no_import_cycle_between_benchmark_modules():
    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                found.add(node.module.removeprefix("benchmarks."))
        graph[path.stem] = found

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        for imported in graph.get(module, ()):
            visit(imported, (*stack, module))

    for module in graph:
        visit(module, ())


def test_flops_per_token_of_gpt2_124m_and_published_peaks():
    from transformers import GPT2Config

    config = GPT2Config()  # 12 layers, hidden 768, vocabulary 50,257
    per_layer = (768 * 2304 + 2304) + (768 * 768 + 768) + 2 * (768 * 3072) + 3072 + 768 + 4 * 768
    lm_head = 50257 * 768  # tied to the input embedding, but a matmul per token all the same
    assert hardware.flops_parameters(config) == 12 * per_layer + 2 * 768 + lm_head
    expected = 6 * (12 * per_layer + 2 * 768 + lm_head) + 12 * 12 * 768 * 1024
    assert hardware.train_flops_per_token(config, 1024) == expected
    assert hardware.published_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert hardware.published_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.published_peak_flops("Tesla T4") is None


def test_optimisations_quick_on_the_tiny_bert(tiny_bert, tmp_path):
    result = json_round_trip(optimisations.run(True, tmp_path, model=str(tiny_bert)))
    names = [r["name"] for r in result["rows"]]
    assert names == [n for n in optimisations.ROWS if n not in optimisations.SLOW]
    assert all(r["on_s"] > 0 and r["off_s"] > 0 and r["speedup"] > 0 for r in result["rows"])
    text = optimisations.markdown(result)
    assert text.startswith("## ")
    assert all(f"| {name} |" in text for name in names)


@pytest.fixture(scope="module")
def tiny_classifier(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT with a fresh 2-label head, saved with its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-classifier")
    torch.manual_seed(0)
    labels = {0: "negative", 1: "positive"}
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def test_inference_ways_agree_with_the_naive_loop(tiny_classifier):
    texts = inference.read_reviews()[:24]
    found = inference.measure_in_process(tiny_classifier, texts)
    assert [w["way"] for w in found["ways"]] == [
        "naive (padded to 128)",
        "naive, unpadded",
        "input order, padded per batch",
        "ours (`Predictor.predict`)",
        "ours (`Predictor.predict`)",
        "ours + `--pad-to-multiple-of 8`",
        "ours + `--precision bf16` (autocast)",
        "ours + `--quantize int8`",
    ]
    exact = [w for w in found["ways"] if w["way"].startswith(inference.EXACT)]
    assert len(exact) == 6  # bf16 and int8 are allowed to differ
    for way in exact:
        assert way["label_agreement_vs_naive"] == 1.0
        assert way["max_probability_gap_vs_naive"] < 1e-5
    assert 0 < found["int8_vs_fp32"]["max_probability_gap"] < 0.2


@pytest.mark.slow
def test_inference_section_quick_on_the_tiny_classifier(tiny_classifier, tmp_path):
    result = json_round_trip(inference.run(True, tmp_path, model=tiny_classifier))
    assert result["processes"]["label_agreement"] == 1.0
    assert result["processes"]["ours"]["peak_rss_mb"] > 0
    assert inference.markdown(result).startswith("## Inference")


@pytest.mark.slow
def test_both_sides_of_a_comparison_on_the_tiny_bert(tiny_bert, data_dir, tmp_path):
    job = replace(
        SENTIMENT,
        train=str(data_dir / "sentiment_train.csv"),
        validation=str(data_dir / "sentiment_validation.csv"),
        max_length=32,
        max_steps=4,
        batch_size=8,
        log_every=1,
    )
    ours = engine.run_job(job, str(tiny_bert), tmp_path)
    hf = hf_reference.run_job(job, str(tiny_bert), tmp_path)
    for side in (ours, hf):
        assert side["steps"] == 4 and side["train_samples"] == 32
        assert side["peak_rss_mb"] > 0 and side["tokens_per_s"] > 0
        assert set(job.metrics) <= set(side["metrics"])
    assert ours["parameters"] == hf["parameters"]
    pair = {"job": asdict(job), "ours": ours, "hf": hf}
    pair["ratio_ours_over_hf"] = ratios(job, ours, hf)
    text = compare_hf_trainer.markdown(json_round_trip({"quick": True, "jobs": [pair]}))
    assert "| sentiment |" in text


# --- the runner ------------------------------------------------------------------------------


def fake_section(name: str, run, markdown) -> str:
    """A section module registered under benchmarks.<name> for this test."""
    module = types.ModuleType(f"benchmarks.{name}")
    module.run, module.markdown = run, markdown
    sys.modules[module.__name__] = module
    return name


@pytest.fixture
def fake_sections(monkeypatch, tmp_path):
    """Three sections: one that works, one whose run fails, one whose Markdown cannot
    render its own result; the results go to tmp_path."""
    stem = tmp_path / "results" / datetime.date.today().isoformat()

    def second_run(quick, work_dir):  # the first section's figures are already on disk
        written = next((tmp_path / "results").glob("*.md")).read_text()
        assert "## 1. works" in written
        raise RuntimeError("out of memory")

    sections = {
        "ok": fake_section("fake_ok", lambda quick, work_dir: {"x": 1}, lambda r: "## works\n\nx"),
        "fails": fake_section("fake_fails", second_run, lambda r: "## never"),
        "bad": fake_section("fake_bad", lambda quick, work_dir: {}, lambda r: f"## {r['x']}"),
    }
    monkeypatch.setattr(runner, "SECTIONS", sections)
    monkeypatch.setattr(runner, "EXTRA", {})
    monkeypatch.setattr(runner, "RESULTS_DIR", tmp_path / "results")
    yield stem
    for name in sections.values():
        sys.modules.pop(f"benchmarks.{name}")


def test_runner_keeps_earlier_sections_and_reports_failures(fake_sections, tmp_path):
    assert runner.main(["--quick", "--work-dir", str(tmp_path / "work")]) == 1
    [md] = (tmp_path / "results").glob("*.md")
    report = json.loads(md.with_suffix(".json").read_text())
    assert md.name == f"{fake_sections.name}-{report['slug']}.md"
    assert report["sections"]["ok"]["result"] == {"x": 1}
    assert report["sections"]["fails"]["error"] == "RuntimeError: out of memory"
    assert report["sections"]["bad"]["error"] == "KeyError: 'x'"
    text = md.read_text()
    assert "## 1. works" in text and "## 2. fails: failed" in text and "## 3. bad: failed" in text
    assert "Generated by `python -m benchmarks.run --quick --work-dir" in text
    assert sorted(p.name for p in md.parent.iterdir()) == sorted([md.name, f"{md.stem}.json"])


def test_runner_names_a_partial_run_apart(fake_sections, tmp_path):
    assert runner.main(["--only", "ok"]) == 0
    [md] = (tmp_path / "results").glob("*.md")
    assert md.stem.endswith("-ok")
    with pytest.raises(SystemExit):
        runner.parse_args(["--only", "nope"])


def test_runner_seeds_replace_the_forms_seeds_and_name_the_file(monkeypatch, tmp_path):
    """`--quick --seeds 0,1,2`: the quick form with its seeds replaced, in a file of its own;
    a section without seeded forms is refused before anything runs."""

    @dataclass(frozen=True)
    class Form:
        rows: int
        seeds: tuple[int, ...]

    def run(quick, work_dir, form=None):
        form = form or module.FORMS[quick]
        return {"rows": form.rows, "seeds": list(form.seeds)}

    fake_section("fake_seeded", run, lambda r: f"## seeds {r['seeds']}")
    module = sys.modules["benchmarks.fake_seeded"]
    module.FORMS = {False: Form(100, (0, 1, 2)), True: Form(10, (0,))}
    fake_section("fake_plain", lambda quick, work_dir: {}, lambda r: "## plain")
    monkeypatch.setattr(runner, "SECTIONS", {"seeded": "fake_seeded", "plain": "fake_plain"})
    monkeypatch.setattr(runner, "EXTRA", {})
    monkeypatch.setattr(runner, "RESULTS_DIR", tmp_path / "results")
    try:
        assert runner.main(["--quick", "--only", "seeded", "--seeds", "3,4"]) == 0
        with pytest.raises(SystemExit):
            runner.parse_args(["--only", "seeded,plain", "--seeds", "3"])
        with pytest.raises(SystemExit):
            runner.parse_args(["--only", "seeded", "--seeds", "3,x"])
    finally:
        for name in ("fake_seeded", "fake_plain"):
            sys.modules.pop(f"benchmarks.{name}")
    [json_file] = (tmp_path / "results").glob("*.json")
    assert json_file.stem.endswith("-seeded-seeds-3-4")
    report = json.loads(json_file.read_text())
    assert report["sections"]["seeded"]["result"] == {"rows": 10, "seeds": [3, 4]}


def rows_of(path: str) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_quality_split_is_fixed_and_disjoint_and_names_the_labels(tmp_path, monkeypatch):
    """Validation is carved from train once (seed 0) for every seed's run; test is apart."""
    for name, rows in (("train_4000.csv", 60), ("test_5000.csv", 30)):
        with (tmp_path / name).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "rating", "label", "text"])
            writer.writerows([f"{name}/{i}", 1, i % 2, f"review {name} {i}"] for i in range(rows))
    monkeypatch.setattr(quality, "DATA", tmp_path)
    form = quality.Form(train_rows=40, validation_rows=10, test_rows=20, max_length=8, seeds=(0,))
    work = tmp_path / "work"
    work.mkdir()
    files = quality.split(form, work)
    read = {k: rows_of(v) for k, v in files.items()}
    assert [len(read[k]) for k in ("train", "validation", "test")] == [40, 10, 20]
    texts = [{r["text"] for r in read[k]} for k in ("train", "validation")]
    assert not texts[0] & texts[1]
    assert {r["label"] for r in read["train"]} == {"negative", "positive"}
    assert all(r["label"] == ("positive" if int(r["text"].split()[-1]) % 2 else "negative")
               for rows in read.values() for r in rows)  # fmt: skip
    quality.split(form, work)  # every form's runs see the same rows
    assert rows_of(files["train"]) == read["train"]


def test_quality_keeps_finished_runs_for_the_same_form_and_code(tmp_path, monkeypatch):
    """A rerun in the same work dir (after a kill) runs only what is not finished: another
    seed list reuses the seeds done; another max_length or other code runs all again."""
    calls = []

    def side(name):
        def run_side(method, seed, form, files, work_dir):
            calls.append((name, method, seed))
            return {"accuracy": 0.5 + seed / 10, "side": name, "max_length": form.max_length}

        return run_side

    monkeypatch.setattr(quality, "SIDES", {"ours": side("ours"), "Trainer": side("Trainer")})
    monkeypatch.setattr(quality, "split", lambda form, work_dir: {})
    monkeypatch.setattr(kept, "code_version", lambda: "commit-a")
    one = quality.Form(10, 2, 4, max_length=8, seeds=(0,))
    first = quality.run(True, tmp_path, form=one)
    assert len(calls) == 2 * len(quality.RECIPES)
    calls.clear()
    three = quality.run(True, tmp_path, form=replace(one, seeds=(0, 1, 2)))
    assert {seed for _, _, seed in calls} == {1, 2} and len(calls) == 4 * len(quality.RECIPES)
    for method, sides in first["runs"].items():
        assert all(three["runs"][method][s][0] == sides[s][0] for s in sides)
    for version, form in (("commit-a", replace(one, max_length=16)), ("commit-b", one)):
        monkeypatch.setattr(kept, "code_version", lambda v=version: v)
        calls.clear()
        quality.run(True, tmp_path, form=form)
        assert len(calls) == 2 * len(quality.RECIPES)
    assert not list(tmp_path.glob("*.tmp"))


def test_quality_goals_compare_means_over_seeds():
    def runs(*accuracies):
        return [{"accuracy": a, "f1": a, "wall_s": 1.0, "steps": 4, "trainable_parameters": 10,
                 "parameters": 100} for a in accuracies]  # fmt: skip

    result = {
        "form": asdict(quality.FORMS[True]),
        "trainer_lr": quality.TRAINER_LR,
        "loads": [0.0],
        "runs": {
            "full": {"ours": runs(0.90, 0.80), "Trainer": runs(0.84, 0.85)},  # 0.850 ≥ 0.845
            "lora": {"ours": runs(0.847, 0.845), "Trainer": runs(0.90, 0.90)},  # 0.846 < 0.90
            "qlora": {"ours": runs(0.80, 0.80), "Trainer": runs(0.70, 0.70)},
        },
    }
    assert quality.goals(result["runs"]) == [
        ("ours full ≥ Trainer full", True),
        ("ours lora ≥ Trainer lora", False),
        ("ours qlora ≥ Trainer qlora", True),
        ("ours LoRA within 0.5 points of ours full (gap 0.40)", True),
    ]
    text = quality.markdown(json_round_trip(result))
    assert "| full | ours | 0.8500 (0.8000–0.9000) |" in text
    assert "| ours lora ≥ Trainer lora | no |" in text


@pytest.mark.slow
def test_multitask_adapters_section_quick_on_the_tiny_bert(tiny_bert, tmp_path):
    from benchmarks import multitask_adapters

    result = json_round_trip(multitask_adapters.run(True, tmp_path, model=tiny_bert))
    result = result["bases"][tiny_bert.name]
    shared, separate = result["ways"]["shared"], result["ways"]["separate"]
    assert shared["task_models"] == separate["task_models"] == 3
    assert shared["parameter_bytes"] < 0.5 * separate["parameter_bytes"]
    assert max(result["max_score_gap"].values()) < 1e-5 and result["labels_equal"]
    assert shared["base_bytes"] < 0.4 * separate["base_bytes"]  # one base instead of three
    text = multitask_adapters.markdown({"bases": {"tiny": result}})
    assert text.startswith("## Adapters of 3 tasks") and "| shared | 3 |" in text


# --- sft ---------------------------------------------------------------------------------------


def test_sft_scores_exact_match_and_normalised_contains():
    answers = ["ant", " Owl.", "grape bat", "two three", "ants", "Kiwi fig"]
    references = ["ant", "owl", "grape", "three", "ant", "kiwi fig"]
    found = sft.scores(answers, references)
    assert found["exact_match"] == pytest.approx(1 / 6)  # only "ant"; spaces around are cut
    assert found["contains"] == pytest.approx(5 / 6)  # whole words: "ants" is not "ant"


TINY_SFT = sft.Form(layers=1, hidden=64, max_length=96, batch_size=8, steps=2, rounds=1,
                    quality_layers=1, quality_hidden=64, epochs=1, prompts=4, max_new_tokens=4,
                    train_rows=48)  # fmt: skip


@pytest.fixture(scope="module")
def sft_result(tmp_path_factory) -> dict:
    """The sft section run once at a tiny size (every process real: 4 throughput runs, 3
    trainings, 4 predictions)."""
    return json_round_trip(sft.run(True, tmp_path_factory.mktemp("sft"), form=TINY_SFT))


@pytest.mark.slow
def test_sft_section_trains_both_sides_alike_and_renders(sft_result):
    runs = sft_result["throughput"]
    assert list(runs) == ["ours unpacked", "TRL unpacked", "ours packed", "TRL packed"]
    assert all(r["tokens_per_s"] > 0 and r["timed_steps"] == 1 for r in runs.values())
    # unpacked, both sides draw the same seeded batches of the same rows and train the
    # same tokens from the same weights: the same batches, padding and losses
    ours, trl = runs["ours unpacked"], runs["TRL unpacked"]
    assert ours["tokens_per_step"] == trl["tokens_per_step"]
    assert ours["pad_share"] == pytest.approx(trl["pad_share"], abs=1e-9)
    assert ours["first_loss"] == pytest.approx(trl["first_loss"], abs=1e-4)
    assert ours["last_loss"] == pytest.approx(trl["last_loss"], abs=1e-3)
    assert runs["TRL packed"]["pad_share"] == 0.0  # padding-free: one row per batch
    assert runs["ours packed"]["pad_share"] < ours["pad_share"] / 2
    assert runs["ours packed"]["tokens_per_step"] > 2 * ours["tokens_per_step"]
    assert 0.05 < sft_result["data"]["answer_share"] < 0.3 and sft_result["data"]["rows"] == 48

    quality = sft_result["quality"]
    methods = quality["methods"]
    assert list(methods) == ["full", "lora", "qlora"] and quality["prompts"] == 4
    assert methods["lora"]["trainable_parameters"] == methods["qlora"]["trainable_parameters"]
    # adapters, and the random embeddings and head in full: fewer than every weight
    assert methods["lora"]["trainable_parameters"] < methods["full"]["trainable_parameters"]
    for found in [quality["before"], *(m["after"] for m in methods.values())]:
        assert 0 <= found["exact_match"] <= found["contains"] <= 1
        rules = found["by_rule"]
        assert set(rules) <= {"count", "first", "last", "reverse", "sort"} and rules
        assert min(rules.values()) <= found["exact_match"] <= max(rules.values())

    text = sft.markdown(sft_result)
    assert text.startswith("## Supervised fine-tuning")
    assert all(f"| {way} |" in text for way in runs)
    assert "| ours packed / TRL packed |" in text and "| qlora | 0.003 |" in text
    assert "| full after |" in text
    goals = runner.goals({"sft": {"result": sft_result}})
    assert sum("sft ours packed" in row for row in goals) == 2
