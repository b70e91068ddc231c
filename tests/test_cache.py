"""trainer.data.cache / trainer.data.prepare: the tokenization cache hits on equal content and
settings, misses on any change, skips reading on a hit, and is built by one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_run_config, write_csv

import trainer.data.cache
import trainer.data.prepare
from trainer.config import DataConfig, load_config
from trainer.data.prepare import prepare_data
from trainer.errors import UserError
from trainer.model.load import load_tokenizer
from trainer.tasks.registry import TASKS


@pytest.fixture
def setup(tmp_path, tiny_models_by_task, data_dir):
    """A classification config on copies of the data files, with its own cache."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("sentiment_train.csv", "sentiment_validation.csv"):
        (data / name).write_bytes((data_dir / name).read_bytes())
    config = make_run_config(tmp_path, "classification", tiny_models_by_task, data)
    return config, data


def prepare(config: Path, *overrides: str):
    cfg = load_config(config, [f"data.cache_dir={config.parent / 'cache'}", *overrides])
    data, _ = prepare_data(cfg, lambda: load_tokenizer(cfg.model, TASKS[cfg.task]))
    return data


def test_second_prepare_hits_and_gives_the_same_examples(setup):
    config, _ = setup
    built = prepare(config)
    hit = prepare(config)
    assert (built.cache["status"], hit.cache["status"]) == ("built", "hit")
    assert built.cache["folder"] == hit.cache["folder"]
    assert hit.train[0].to_list() == built.train[0].to_list()
    assert hit.validation.to_list() == built.validation.to_list()
    assert hit.label_names == built.label_names == ["negative", "positive"]


def test_a_changed_file_or_setting_makes_a_new_key_but_touching_a_file_does_not(setup):
    config, data = setup
    original = prepare(config)
    first = original.cache["folder"]
    os.utime(data / "sentiment_train.csv", (time.time() + 60, time.time() + 60))
    touched = prepare(config).cache
    assert (touched["status"], touched["folder"]) == ("hit", first)
    changed = prepare(config, "data.max_length=16")
    assert changed.cache["status"] == "built" and changed.cache["folder"] != first
    with (data / "sentiment_train.csv").open("a") as handle:
        handle.write("a new review that changes the content,positive\n")
    edited = prepare(config)
    assert edited.cache["status"] == "built"
    assert len(edited.train[0]) == len(original.train[0]) + 1


def test_another_tokenizer_makes_a_new_key(setup, tmp_path, tiny_bert):
    config, _ = setup
    first = prepare(config).cache["folder"]
    other = tmp_path / "other-tokenizer"
    tokenizer = load_tokenizer(load_config(config).model, TASKS["classification"])
    tokenizer.add_tokens(["cinematography"])
    tokenizer.save_pretrained(other)
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((tiny_bert / name).read_bytes())
    rebuilt = prepare(config, f"model.name_or_path={other}")
    assert rebuilt.cache["status"] == "built" and rebuilt.cache["folder"] != first


def test_a_hit_reads_no_rows(setup, monkeypatch):
    config, _ = setup
    prepare(config)

    def no_reading(*args, **kwargs):
        raise AssertionError("rows were read on a cache hit")

    monkeypatch.setattr(trainer.data.prepare, "read_split", no_reading)
    assert prepare(config).cache["status"] == "hit"


def test_a_bad_row_fails_before_the_tokenizer_is_loaded_and_nothing_is_cached(setup):
    config, data = setup
    write_csv(data / "sentiment_train.csv", [{"text": "fine", "label": "positive"}] * 3)
    with (data / "sentiment_train.csv").open("a") as handle:
        handle.write(",negative\n")
    cfg = load_config(config, [f"data.cache_dir={config.parent / 'cache'}"])

    def tokenizer():
        raise AssertionError("the tokenizer was loaded before the rows were checked")

    with pytest.raises(UserError, match=r"sentiment_train\.csv row 4: empty text"):
        prepare_data(cfg, tokenizer)
    assert not list((config.parent / "cache").glob("*/meta.json"))


def test_cache_off_tokenizes_in_memory(setup):
    config, _ = setup
    data = prepare(config, "data.cache_dir=null")
    assert (data.cache["status"], data.cache["folder"]) == ("off", None)
    assert not (config.parent / "cache").exists()


@pytest.mark.slow
def test_concurrent_processes_build_once(setup):
    """Two `trainer prepare` at once (as two ranks would): one builds, the other waits on
    the lock and loads what the first built."""
    config, _ = setup
    command = [sys.executable, "-m", "trainer", "prepare", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO, env=env) for _ in "ab"]
    outputs = [run.communicate(timeout=300)[0].decode().splitlines()[-1] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    stats = [json.loads(line) for line in outputs]
    assert sorted(s["status"] for s in stats) == ["built", "hit"]
    assert stats[0]["folder"] == stats[1]["folder"]


# --- cluster filesystems: no working lock, damaged entries, hashing once per node ----------


@pytest.fixture
def node_memo(tmp_path, monkeypatch) -> Path:
    """A node-local memo of digests of this test's own (as on a fresh node)."""
    folder = tmp_path / "node-memo"
    monkeypatch.setattr(trainer.data.cache, "DIGESTS_DIR", folder, raising=False)
    return folder


def entry_folder(config: Path) -> Path:
    (folder,) = (config.parent / "cache").glob(f"*/{trainer.data.cache.META_NAME}")
    return folder.parent


def test_the_first_publish_wins_and_a_later_builder_drops_its_copy(setup, node_memo):
    config, _ = setup
    built = prepare(config)
    folder = Path(built.cache["folder"])
    entry = trainer.data.cache.load_entry(folder)
    assert trainer.data.cache.save_entry(entry, folder) == folder  # a second, late builder
    assert trainer.data.cache.is_cached(folder)
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]
    assert prepare(config).cache["status"] == "hit"


@pytest.mark.parametrize("damage", ["purged", "truncated", "flipped", "meta"])
def test_a_damaged_entry_is_rebuilt_not_read(setup, node_memo, damage):
    config, _ = setup
    expected = prepare(config).train[0].to_list()  # read now: the entry is memory-mapped
    folder = entry_folder(config)
    (arrow, *_) = sorted(folder.rglob("*.arrow"))
    if damage == "purged":
        arrow.unlink()
    elif damage == "truncated":
        arrow.write_bytes(arrow.read_bytes()[:-100])
    elif damage == "flipped":  # same size: only the hash finds it, on a node that has not
        shutil.rmtree(node_memo)  # verified the entry yet
        data = bytearray(arrow.read_bytes())
        data[len(data) // 2] ^= 0xFF
        arrow.write_bytes(bytes(data))
    else:
        (folder / "meta.json").write_text('{"splits": ["train-0"')
    rebuilt = prepare(config)
    assert rebuilt.cache["status"] == "built"
    assert rebuilt.train[0].to_list() == expected
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]


def test_the_corpus_is_hashed_once_per_node(setup, node_memo, monkeypatch):
    config, data = setup
    hashed = []
    real = trainer.data.cache.hashlib.file_digest

    def counting(handle, name):
        hashed.append(Path(handle.name).name)
        return real(handle, name)

    monkeypatch.setattr(trainer.data.cache.hashlib, "file_digest", counting)
    cfg = load_config(config, [])
    first = trainer.data.prepare.data_key(cfg)
    assert sorted(hashed) == ["sentiment_train.csv", "sentiment_validation.csv"]
    hashed.clear()
    assert trainer.data.prepare.data_key(cfg) == first and hashed == []  # the other ranks
    with (data / "sentiment_train.csv").open("a") as handle:
        handle.write("one more,positive\n")
    assert trainer.data.prepare.data_key(cfg) != first
    assert hashed == ["sentiment_train.csv"]


@pytest.mark.slow
def test_builders_on_nodes_whose_locks_do_not_see_each_other(setup):
    """Two `trainer prepare` at once with the lock made a no-op (flock on NFS `nolock`):
    both finish, one entry is published, nothing half-built is left."""
    config, _ = setup
    patched = (
        "import contextlib, sys, trainer.data.cache as c; "
        "c.lock = lambda *a: contextlib.nullcontext(); "
        "from trainer.cli import main; sys.exit(main(['prepare', sys.argv[1]]))"
    )
    command = [sys.executable, "-c", patched, str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO, env=env) for _ in "ab"]
    outputs = [run.communicate(timeout=300)[0].decode().splitlines()[-1] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    stats = [json.loads(line) for line in outputs]
    assert stats[0]["folder"] == stats[1]["folder"]
    published = Path(stats[0]["folder"])
    assert [p.name for p in published.parent.iterdir() if p.is_dir()] == [published.name]


def test_the_default_cache_follows_hf_home_then_xdg_cache_home(setup, monkeypatch, tmp_path):
    root = trainer.data.cache.cache_root
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert root("auto") == tmp_path / "home" / ".cache" / "trainer" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert root("auto") == tmp_path / "xdg" / "trainer" / "data"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert root("auto") == tmp_path / "hf" / "trainer" / "data"
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    assert root("$SCRATCH/cache") == tmp_path / "scratch" / "cache"
    # a run config that leaves data.cache_dir unset builds its entry under HF_HOME
    config, _ = setup
    cfg = load_config(config, ["data.cache_dir=auto"])
    assert load_config(config).data.cache_dir != "auto"  # the test configs name a folder
    data, _ = prepare_data(cfg, lambda: load_tokenizer(cfg.model, TASKS[cfg.task]))
    assert data.cache["status"] == "built"
    assert Path(data.cache["folder"]).parent == tmp_path / "hf" / "trainer" / "data"
    assert DataConfig().cache_dir == "auto"


def test_sft_settings_that_change_the_rows_make_a_new_key(tmp_path, tiny_llama_chat):
    """Packing, the loss on the prompt and truncation change sft's encoded rows: a run with
    one of them changed on the same cache builds its own entry (a packed run once read an
    unpacked run's rows, which have no example lengths)."""
    train = tmp_path / "train.jsonl"
    rows = [{"prompt": f"reverse: good day {i}", "completion": f" {i} day good"} for i in range(6)]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"task: sft\noutput_dir: {tmp_path / 'run'}\nmodel:\n  name_or_path: {tiny_llama_chat}\n"
        f"data:\n  train: {train}\n  max_length: 64\n"
    )
    unpacked = prepare(config)
    assert unpacked.cache["status"] == "built" and "example_lengths" not in unpacked.train[0][0]
    packed = prepare(config, "data.packing=true")
    assert packed.cache["status"] == "built" and packed.cache["folder"] != unpacked.cache["folder"]
    assert len(packed.train[0]) < len(rows) and "example_lengths" in packed.train[0][0]
    for setting in ("train_on_prompt=true", "truncation=drop", "last_turn_only=true"):
        assert prepare(config, f"data.{setting}").cache["status"] == "built"
    assert prepare(config, "data.packing=true").cache["status"] == "hit"


# --- values derived from an entry (a preference run's reference scores) ---------------------


def test_derived_values_are_built_by_one_of_several_processes_and_read_by_the_others(tmp_path):
    """Two builders at once (as two ranks of a node): one builds under the lock, the other
    waits and reads what it published; a damaged copy is rebuilt, never read."""
    import threading

    import datasets

    entry, key, builds = tmp_path / "entry", {"model": "m"}, []

    def build() -> trainer.data.cache.Entry:
        builds.append(1)
        time.sleep(0.3)  # long enough for the other to be waiting on the lock
        return trainer.data.cache.Entry({"train-0": datasets.Dataset.from_dict({"x": [1.5]})}, {})

    results = []

    def builder() -> None:
        results.append(trainer.data.cache.derived_entry(entry, "reference", key, build))

    threads = [threading.Thread(target=builder) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and sorted(cached for _, cached in results) == [False, True]
    assert [e.splits["train-0"]["x"] for e, _ in results] == [[1.5], [1.5]]
    folder = trainer.data.cache.derived_folder(entry, "reference", key)
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]  # no tmp
    assert trainer.data.cache.derived_folder(entry, "reference", {"model": "n"}) != folder
    (folder / trainer.data.cache.META_NAME).write_text("{")  # half-written
    _, cached = trainer.data.cache.derived_entry(entry, "reference", key, build)
    assert not cached and len(builds) == 2
