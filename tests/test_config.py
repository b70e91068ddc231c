"""trainer.config: shipped configs parse, every problem is reported at once, naming its key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    RunConfig,
    build_config,
    dump_yaml,
    load_config,
)
from trainer.data.sources import train_sources
from trainer.durations import parse_duration
from trainer.errors import UserError
from trainer.tasks.registry import TASKS
from trainer.yaml_sections import apply_overrides, read_yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))  # run configs (profiles: launch/clusters)


def minimal(**sections) -> dict:
    """The smallest raw config that validates for training, with sections updated."""
    raw = {
        "task": "classification",
        "model": {"name_or_path": "some/model"},
        "data": {"train": "train.csv"},
        "train": {"global_batch_size": 8, "micro_batch_size": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


def error_of(raw: dict, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        build_config(raw, world_size=kwargs.pop("world_size", 1), **kwargs)
    return str(caught.value)


# --- shipped configs -----------------------------------------------------------------------


def test_there_are_shipped_configs():
    assert SHIPPED, "configs/ should ship at least one run config"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_parses(path: Path):
    cfg = load_config(path)
    assert cfg.task in TASKS
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_starts_with_the_command_that_runs_it(path: Path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert f"trainer train {path.relative_to(REPO)}" in "\n".join(header)


# --- errors name their key -----------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_closest():
    message = error_of(minimal(trian={"lr": 1e-3}))
    assert "unknown key 'trian'" in message
    assert "did you mean 'train'" in message


def test_unknown_nested_key_suggests_the_closest():
    message = error_of(minimal(train={"learning_rat": 1e-3, "global_batch_size": 8}))
    assert "unknown key 'train.learning_rat'" in message
    assert "did you mean" in message


def test_unknown_key_far_from_anything_has_no_suggestion():
    message = error_of(minimal(zzzzqqq=1))
    assert "unknown key 'zzzzqqq'" in message
    assert "did you mean" not in message


def test_all_problems_are_reported_in_one_message():
    raw = minimal(
        train={"lr": "fast", "epochs": -1, "warmup_ratio": 2.0},
        data={"max_lenght": 64},
        task="translation",
    )
    message = error_of(raw)
    for key in ("train.lr", "train.epochs", "train.warmup_ratio", "data.max_lenght", "task"):
        assert key in message, key
    assert message.count(";") >= 4


def test_wrong_type_names_key_expected_type_and_value():
    message = error_of(minimal(train={"epochs": "three"}))
    assert "train.epochs: expected an integer, got 'three'" in message


def test_bool_is_not_an_integer():
    assert "train.epochs: expected an integer" in error_of(minimal(train={"epochs": True}))


def test_section_must_be_a_mapping():
    assert "train: must be a mapping" in error_of(minimal(train=5))


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "lr", 0.0, "train.lr: must be > 0"),
        ("train", "micro_batch_size", 0, "train.micro_batch_size: must be > 0"),
        ("train", "weight_decay", -0.1, "train.weight_decay: must be >= 0"),
        ("train", "warmup_ratio", 1.0, "train.warmup_ratio: must be in [0, 1)"),
        ("train", "layerwise_lr_decay", 0.0, "train.layerwise_lr_decay: must be in (0, 1]"),
        ("data", "validation_split", 1.0, "data.validation_split: must be in [0, 1)"),
        ("data", "max_length", 0, "data.max_length: must be > 0"),
        ("mlm", "mask_probability", 0.0, "mlm.mask_probability: must be in (0, 1)"),
        ("mlm", "mask_token_fraction", 1.5, "mlm.mask_token_fraction: must be in [0, 1]"),
        ("train", "scheduler", "step", "train.scheduler: 'step' is not one of"),
        ("train", "precision", "fp8", "train.precision: 'fp8' is not one of"),
        ("model", "attn_implementation", "fast", "model.attn_implementation: 'fast' is not"),
    ],
)
def test_range_and_choice_errors(section, key, value, expected):
    assert expected in error_of(minimal(**{section: {key: value}}))


def test_nan_learning_rate_is_rejected():
    # NaN compares false with everything, so a `value <= 0` check lets it through.
    assert "train.lr" in error_of(minimal(train={"lr": float("nan")}))


def test_mask_and_random_fractions_must_not_exceed_one():
    raw = minimal(mlm={"mask_token_fraction": 0.8, "random_token_fraction": 0.3})
    assert "mask_token_fraction + random_token_fraction > 1" in error_of(raw)


def test_eval_metric_must_belong_to_the_task():
    message = error_of(minimal(task="mlm", eval={"metric": "accuracy"}))
    assert "eval.metric: 'accuracy' is not one of perplexity, loss" in message


def test_training_needs_model_and_data():
    raw = {"task": "mlm"}
    message = error_of(raw)
    assert "model.name_or_path: required" in message
    assert "data.train: required" in message
    # `trainer evaluate` builds its config without training checks: no data.train needed.
    cfg = build_config({"task": "mlm", "model": {"name_or_path": "m"}}, for_training=False)
    assert cfg.data.train is None


def test_validation_and_split_are_exclusive():
    raw = minimal(data={"validation": "v.csv", "validation_split": 0.1})
    assert "data.validation_split: can't use both" in error_of(raw)


def test_early_stopping_needs_validation():
    raw = minimal(eval={"early_stopping_patience": 2})
    assert "eval.early_stopping_patience: needs data.validation" in error_of(raw)


def test_train_sources_with_weights_are_normalised():
    raw = minimal(data={"train": [{"path": "a.csv", "weight": 3}, "b.csv"]})
    sources = train_sources(build_config(raw, world_size=1).data)
    assert [(s.path, s.weight) for s in sources] == [("a.csv", 0.75), ("b.csv", 0.25)]


def test_bad_train_sources_name_their_entry():
    bad = [{"path": "a.csv", "weight": 0}, {"pth": "b.csv"}, 7, {"weight": 1}]
    message = error_of(minimal(data={"train": bad}))
    assert "data.train[0].weight: must be a number > 0, got 0" in message
    assert "data.train[1]: unknown key(s) pth" in message
    assert "data.train[2]: expected a path or {path: P, weight: W}, got 7" in message
    assert "data.train[3].path: required" in message
    assert "data.train: an empty list" in error_of(minimal(data={"train": []}))


def test_data_layout_options_are_checked_against_the_task():
    message = error_of(
        minimal(data={"streaming": True, "validation_split": 0.1, "isolate_documents": True})
    )
    assert "data.streaming: only for mlm, clm, sft (the other tasks' sets" in message
    assert "data.streaming: a stream has no known length; set train.max_steps" in message
    assert "data.validation_split: not with streaming" in message
    assert "data.isolate_documents: only for mlm and clm" in message
    message = error_of(minimal(task="mlm", data={"group_by_length": True, "shuffle_buffer": 0}))
    assert "data.group_by_length: mlm/clm blocks are packed" in message
    assert "data.shuffle_buffer: must be > 0, got 0" in message


# --- global batch and processes ------------------------------------------------------------


def test_the_micro_batch_is_the_most_per_forward_and_fits_the_processes():
    """A recipe's micro batch 16 runs on 2 and on 16 processes; 3 can't share 48 + 1."""
    raw = minimal(train={"global_batch_size": 16, "micro_batch_size": 16})
    assert build_config(raw, world_size=1).train.micro_batch_size == 16
    cfg = build_config(raw, world_size=2)
    assert (cfg.train.micro_batch_size, cfg.gradient_accumulation_steps(2)) == (8, 1)
    assert build_config(raw, world_size=16).train.micro_batch_size == 1
    raw = minimal(train={"global_batch_size": 48, "micro_batch_size": 5})
    cfg = build_config(raw, world_size=2)  # 24 each: 4 x 6 micro-batches, not 5 (no fit)
    assert (cfg.train.micro_batch_size, cfg.gradient_accumulation_steps(2)) == (4, 6)
    raw = minimal(train={"global_batch_size": 49, "micro_batch_size": 7})
    message = error_of(raw, world_size=3)
    assert "train.global_batch_size: 49 is not divisible by the 3 processes" in message


def test_gradient_accumulation_is_derived_from_the_global_batch():
    cfg = build_config(
        minimal(train={"global_batch_size": 32, "micro_batch_size": 4}), world_size=2
    )
    assert cfg.gradient_accumulation_steps(1) == 8
    assert cfg.gradient_accumulation_steps(2) == 4
    assert cfg.gradient_accumulation_steps(8) == 1


def test_world_size_comes_from_the_environment(monkeypatch):
    raw = minimal(train={"global_batch_size": 12, "micro_batch_size": 4})
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(UserError, match="by the 5 processes"):
        build_config(raw)
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert build_config(raw).gradient_accumulation_steps(3) == 1


# --- YAML and overrides --------------------------------------------------------------------


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as the string "1e-3".
    path = tmp_path / "run.yaml"
    path.write_text(
        "task: mlm\nmodel: {name_or_path: m}\ndata: {train: t.txt}\n"
        "train: {lr: 1e-3, weight_decay: 0, global_batch_size: 8, micro_batch_size: 4}\n"
    )
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.weight_decay, float)
    assert load_config(path, ["train.lr=3e-5"]).train.lr == pytest.approx(3e-5)
    # a number-or-null field too (its 1e-3 was refused as a string)
    cfg = load_config(path, ["train.head_lr=5e-5", "train.head_warmup_ratio=1e-1"])
    assert (cfg.train.head_lr, cfg.train.head_warmup_ratio) == (pytest.approx(5e-5), 0.1)
    assert load_config(path, ["train.head_lr=null"]).train.head_lr is None
    with pytest.raises(UserError, match=r"train\.head_lr: expected a finite number, got inf"):
        load_config(path, ["train.head_lr=.inf"])


def test_overrides_are_parsed_as_yaml():
    raw = apply_overrides(
        minimal(),
        [
            "train.epochs=5",
            "train.lr=0.5",
            "train.gradient_checkpointing=true",
            "data.validation=null",
            "log.trackers=[]",
            "output_dir=runs/x",
            "data.text_column=sentence",
        ],
    )
    assert raw["train"]["epochs"] == 5
    assert raw["train"]["lr"] == 0.5
    assert raw["train"]["gradient_checkpointing"] is True
    assert raw["data"]["validation"] is None
    assert raw["log"]["trackers"] == []
    assert raw["output_dir"] == "runs/x"
    assert raw["data"]["text_column"] == "sentence"
    cfg = build_config(raw)
    assert cfg.train.epochs == 5
    assert cfg.log.trackers == []


def test_override_reaches_into_nested_dict_and_keeps_siblings():
    raw = minimal(model={"name_or_path": "m", "config_overrides": {"hidden_dropout_prob": 0.0}})
    merged = apply_overrides(raw, ["model.config_overrides.num_hidden_layers=1"])
    cfg = build_config(merged)
    assert cfg.model.config_overrides == {"hidden_dropout_prob": 0.0, "num_hidden_layers": 1}
    assert cfg.model.name_or_path == "m"
    assert raw["model"]["config_overrides"] == {"hidden_dropout_prob": 0.0}, "input mutated"


def test_override_creates_missing_sections():
    merged = apply_overrides({}, ["eval.metric=loss"])
    assert merged == {"eval": {"metric": "loss"}}


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(UserError, match=r"override 'train\.lr': expected key=value"):
        apply_overrides({}, ["train.lr"])


def test_misspelled_override_key_suggests_the_closest():
    message = error_of(apply_overrides(minimal(), ["train.epoch=2"]))
    assert "unknown key 'train.epoch'" in message
    assert "did you mean 'train.epochs'" in message


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        read_yaml(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: mlm\ntrain: {lr: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+ column \d+: not valid YAML"):
        read_yaml(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping"):
        read_yaml(listed)


def test_resolved_config_round_trips_through_yaml():
    cfg = build_config(minimal(train={"lr": 2e-4, "global_batch_size": 16}))
    assert build_config(yaml.safe_load(dump_yaml(cfg))) == cfg
    assert list(yaml.safe_load(dump_yaml(cfg)))[:2] == ["task", "output_dir"]


def test_defaults_are_sane():
    cfg = RunConfig()
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    assert math.isclose(cfg.mlm.mask_probability, 0.15)
    assert cfg.model.config_overrides == {}
    assert RunConfig().model.config_overrides is not cfg.model.config_overrides


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90 * 60),  # SLURM: a bare number is minutes
        ("90:30", 90 * 60 + 30),
        ("12:00:00", 12 * 3600),
        ("1-12", 86400 + 12 * 3600),  # a day and 12 hours, not 12 seconds
        ("1-12:30", 86400 + 12 * 3600 + 30 * 60),
        ("2-00:00:05", 2 * 86400 + 5),
    ],
)
def test_max_time_reads_like_slurm(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "00:00", "1:2:3:4", "1-", "-5", "1h"])
def test_max_time_rejects_zero_and_other_formats(text):
    with pytest.raises(UserError, match=r"train.max_time: .* leave it unset for no limit"):
        build_config({"train": {"max_time": text}, "data": {"train": "x.csv"}})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("task: mlm\ntrain:\n\tlr: 1\n", "line 3 column 1: .*YAML indents with spaces, not tabs"),
        (
            "task: mlm\ntrain:\n  lr: 1\n   epochs: 2\n",
            "line 4 column 10: .*check the indentation of this line and the one above.*'epochs: 2'",
        ),
    ],
)
def test_a_yaml_error_says_why(tmp_path, text, why):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(UserError, match=why):
        read_yaml(bad)
