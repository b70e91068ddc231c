"""Precomputed reference scores (preference.precompute_reference) in the tokenization cache:
a later run, a resumed run reads them instead of scoring and trains bitwise alike; the key
follows the weights and the data settings; a damaged score file is rebuilt, never read;
ZeRO-3 scores with the prepared (sharded) model; a frozen copy under a sharding profile is
refused before the launch, naming precompute_reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_jsonl
from interrupted_runs import assert_same_tensors, comparable, final_weights, stop_in_process
from test_preference import pair_rows, preference_config, train
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainer.tasks.preference_reference as reference
from trainer.errors import UserError

PRECOMPUTE = {"preference.precompute_reference": "true"}


@pytest.fixture
def pairs(tmp_path) -> dict[str, str]:
    """16 training pairs and 5 validation pairs (an uneven last scoring batch)."""
    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(16, 11))
    valid_file = write_jsonl(tmp_path / "valid.jsonl", pair_rows(5, 12))
    return {"train": str(train_file), "data.validation": str(valid_file)}


@pytest.fixture
def scored(monkeypatch) -> list[int]:
    """How many pairs the reference scored in this process (0: all read from the cache)."""
    counts: list[int] = []
    real = reference.reference_scores

    def counting(scorer, model, device, pairs, rows, *args, **kwargs):
        counts.append(len(rows))
        return real(scorer, model, device, pairs, rows, *args, **kwargs)

    monkeypatch.setattr(reference, "reference_scores", counting)
    return counts


def run(folder: Path, model, files: dict, cache: Path | None, **settings) -> Path:
    """A 4-step precompute run in `folder` with the data cache in `cache` (None: off)."""
    settings = {"data.validation": files["data.validation"], "train.max_steps": 4,
                "eval.every_steps": 2, "eval.batch_size": 2,
                "data.cache_dir": "null" if cache is None else str(cache)} | settings  # fmt: skip
    argv = preference_config(folder, model, files["train"], **PRECOMPUTE, **settings)
    assert train(argv) == 0
    return folder / "run"


def scores_status(run_dir: Path) -> str:
    summary = json.loads((run_dir / "run_summary.json").read_text())
    return summary["data_cache"]["reference_scores"]


def test_a_second_run_reads_the_scores_and_trains_bitwise_alike(
    tmp_path, tiny_llama_chat, pairs, scored, capsys
):
    cache = tmp_path / "cache"
    first = run(tmp_path / "first", tiny_llama_chat, pairs, cache)
    assert scores_status(first) == "built" and sum(scored) == 21
    capsys.readouterr()
    scored.clear()
    second = run(tmp_path / "second", tiny_llama_chat, pairs, cache)
    assert scores_status(second) == "hit" and scored == []  # not one pair scored
    assert "reference log-probabilities of 21 pairs: read from the data cache" in (
        capsys.readouterr().err
    )
    off = run(tmp_path / "off", tiny_llama_chat, pairs, None)  # as before the cache kept them
    assert scores_status(off) == "off" and sum(scored) == 21
    assert comparable(second) == comparable(first) == comparable(off)
    assert any("eval_rewards/margin" in r for r in comparable(first))
    assert_same_tensors(final_weights(second), final_weights(first))
    assert_same_tensors(final_weights(off), final_weights(first))


def perturb(model_dir: Path) -> None:
    """Other weights in the same folder (another seed's noise on every tensor), as when a
    model is saved again under its old path; the tokenizer is untouched."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.save_pretrained(model_dir)


def test_the_key_follows_the_weights_and_max_length(tmp_path, tiny_llama_chat, pairs, scored):
    cache, model = tmp_path / "cache", tmp_path / "model"
    shutil.copytree(tiny_llama_chat, model)
    settings = {
        "a": {},
        "again": {},
        "shorter": {"data.max_length": 48},  # another data entry
        "bigger-batch": {"eval.batch_size": 4},  # other padding, other float sums
        "other-weights": {},
    }
    statuses = {}
    for name, extra in settings.items():
        if name == "other-weights":
            perturb(model)
        statuses[name] = scores_status(run(tmp_path / name, model, pairs, cache, **extra))
    assert statuses == {"a": "built", "again": "hit", "shorter": "built",
                        "bigger-batch": "built", "other-weights": "built"}  # fmt: skip
    entries = [p.parent.parent.name for p in cache.glob("*/derived/reference-*/")]
    assert len(entries) == 4 and len(set(entries)) == 2  # max_length: another data entry
    a, other = (comparable(tmp_path / name / "run") for name in ("a", "other-weights"))
    # log(2) both: the policy is its reference (to float rounding: 6e-8 apart on AMD EPYC)
    assert a[0]["loss"] == pytest.approx(other[0]["loss"], rel=1e-6)
    assert a[0]["logps/chosen"] != other[0]["logps/chosen"]  # the reference changed with it


def score_folder(cache: Path) -> Path:
    (folder,) = cache.glob("*/derived/reference-*/")
    return folder


@pytest.mark.parametrize("damage", ["truncated", "half-written"])
def test_a_damaged_score_file_is_rebuilt_never_read(
    tmp_path, tiny_llama_chat, pairs, scored, damage
):
    cache = tmp_path / "cache"
    first = run(tmp_path / "first", tiny_llama_chat, pairs, cache)
    folder = score_folder(cache)
    if damage == "truncated":
        arrow = next((folder / "train-0").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    else:  # stopped before its file list, which is written last
        (folder / "meta.json").unlink()
    scored.clear()
    second = run(tmp_path / "second", tiny_llama_chat, pairs, cache)
    assert scores_status(second) == "built" and sum(scored) == 21
    assert score_folder(cache) == folder  # rebuilt in place, the damaged copy gone
    assert comparable(second) == comparable(first)
    assert_same_tensors(final_weights(second), final_weights(first))


def test_a_run_stopped_mid_epoch_resumes_exactly_reading_its_scores(
    tmp_path, tiny_llama_chat, scored
):
    """24 pairs, 3 steps an epoch: stopped after step 4 (a checkpoint), in the second
    epoch; the resumed start reads the scores its first start stored."""
    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(24, 4))
    settings = {"train.max_steps": 6, "log.every_steps": 1, "checkpoint.every_steps": 2}
    runs = {
        name: preference_config(
            tmp_path / name, tiny_llama_chat, train_file, **settings, **PRECOMPUTE
        )
        for name in ("whole", "cut")
    }
    assert train(runs["whole"]) == 0
    from trainer.run.stop import EXIT_PREEMPTED

    assert stop_in_process(runs["cut"][0], 4, *runs["cut"][1:]) == EXIT_PREEMPTED
    scored.clear()
    assert train(runs["cut"]) == 0
    whole, cut = tmp_path / "whole" / "run", tmp_path / "cut" / "run"
    assert scored == [] and scores_status(cut) == "hit"
    assert comparable(cut) == comparable(whole)
    assert [r["step"] for r in comparable(cut)] == [1, 2, 3, 4, 5, 6]
    assert_same_tensors(final_weights(cut), final_weights(whole))


@pytest.mark.slow
def test_two_processes_score_once_and_train_as_one(tmp_path, tiny_llama_chat, pairs):
    """`trainer launch` on two CPU processes (gloo DDP) with a fresh cache: one of them
    scores and publishes while the other waits on the lock and reads, one score folder and
    no builder's copy left; the run is the one-process run's to 1e-5, as in
    test_preference.py's 1 vs 2 process test (the gradient all-reduce sums in another
    order)."""
    from interrupted_runs import cli

    one = run(tmp_path / "one", tiny_llama_chat, pairs, tmp_path / "one-cache")
    cache = tmp_path / "two-cache"
    argv = preference_config(
        tmp_path / "two", tiny_llama_chat, pairs["train"], **PRECOMPUTE,
        **{"data.validation": pairs["data.validation"], "train.max_steps": 4,
           "eval.every_steps": 2, "eval.batch_size": 2, "data.cache_dir": str(cache)},
    )  # fmt: skip
    assert cli("launch", argv[0], "--cluster", "cpu-2proc", *argv[1:]) == 0
    two = tmp_path / "two" / "run"
    assert scores_status(two) in ("built", "hit")  # whichever process came first built
    folder = score_folder(cache)
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]
    for got, want in zip(comparable(two), comparable(one), strict=True):
        for key, value in want.items():
            if key not in ("tokens_per_s", "targets_per_s", "pad_fraction", "tokens"):
                assert got[key] == pytest.approx(value, abs=1e-5), (got["step"], key)


# --- sharded weights ----------------------------------------------------------------------


def test_shares_of_the_pairs_score_as_the_whole_in_as_many_forward_passes(tiny_llama_chat):
    """What each process of a sharded run scores: 5 pairs as shares 0-2 and 3-4 in 2
    forward passes each (the second share repeats its last batch, dropped) give the
    scores of all 5 at once; a process with no share still runs its passes."""
    from trainer.config import DataConfig
    from trainer.data.preference_encode import encode_pairs
    from trainer.data.read import Split
    from trainer.tasks.preference import PairObjective

    rows = pair_rows(5, 13)
    split = Split("data.train", rows, [f"row {i}" for i in range(5)])
    encoded = encode_pairs(split, AutoTokenizer.from_pretrained(tiny_llama_chat), DataConfig())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat)
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    scorer, cpu = PairObjective(None, model, adapter_off=False), torch.device("cpu")
    whole = reference.reference_scores(scorer, model, cpu, encoded, range(5), 2)
    assert len(whole) == 5 and len(forwards) == 3
    forwards.clear()
    shares = [
        reference.reference_scores(scorer, model, cpu, encoded, rows, 2, forwards=2)
        for rows in (range(0, 3), range(3, 5), range(5, 5))
    ]
    assert len(forwards) == 6 and shares[2] == []
    flat = [value for pair in shares[0] + shares[1] for value in pair]
    assert flat == pytest.approx([value for pair in whole for value in pair], abs=1e-5)


def profile_file(folder: Path, name: str, **settings) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"device": "cpu", "precision": "no", **settings}))
    return path


def test_a_frozen_copy_under_a_sharding_profile_is_refused_before_the_launch(
    tmp_path, tiny_llama_chat
):
    from launch.job import checked_job

    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(8, 0))
    argv = preference_config(tmp_path, tiny_llama_chat, train_file, **{"train.lr": -1})
    zero3 = profile_file(tmp_path, "zero3", backend="deepspeed", zero_stage=3)
    with pytest.raises(UserError) as err:
        checked_job(argv[0], str(zero3), argv[1:])
    message = str(err.value)  # every problem at once: the run config's own, and this one
    assert "train.lr: must be > 0" in message
    assert (
        "preference.loss: dpo in full fine-tuning under ZeRO-3/FSDP would need a sharded "
        "frozen reference copy, which is not supported; set preference.precompute_reference: "
        "true" in message
    )
    assert "lora or qlora" in message and "simpo or orpo" in message
    assert message.endswith("(profile zero3 shards the weights)")
    good = [item for item in argv[1:] if item != "train.lr=-1"]
    for fixed in ("preference.precompute_reference=true", "peft.method=lora"):
        checked_job(argv[0], str(zero3), [*good, fixed])  # no error
    zero2 = profile_file(tmp_path, "zero2", backend="deepspeed", zero_stage=2)
    checked_job(argv[0], str(zero2), good)  # ZeRO-2 keeps whole weights: a copy is fine


@pytest.mark.slow
def test_zero3_on_cpu_scores_with_the_prepared_model_and_trains_as_a_plain_run(
    tmp_path, tiny_llama_chat, pairs
):
    """ZeRO-3 partitions the weights as they load (zero.Init), so the initial model can't
    score before DeepSpeed prepares it; the prepared one does. Then the run's log and final
    weights are the plain run's, up to float rounding: ZeRO-3 reduces flat partitions in
    another order (~1e-7 relative in fp32), which the rewards, beta x a difference of
    log-probabilities near -70, carry as ~1e-6 absolute. A second start reads the scores.
    One process: DeepSpeed's CPU accelerator starts no process group of two here."""
    from test_sharded_backends import run_launched

    from launch.job import resolve_job

    plain = run(tmp_path / "plain", tiny_llama_chat, pairs, tmp_path / "plain-cache")
    zero3 = profile_file(tmp_path, "zero3", backend="deepspeed", zero_stage=3)
    for start in ("built", "hit"):
        argv = preference_config(
            tmp_path / "zero3", tiny_llama_chat, pairs["train"], **PRECOMPUTE,
            **{"data.validation": pairs["data.validation"], "train.max_steps": 4,
               "eval.every_steps": 2, "eval.batch_size": 2,
               "output_dir": str(tmp_path / "zero3" / start)},
        )  # fmt: skip
        job = resolve_job(argv[0], str(zero3), argv[1:])
        run_launched(job, 29470 + len(start))
        summary = json.loads((job.run_dir / "run_summary.json").read_text())
        assert summary["distributed_type"] == "DEEPSPEED"
        assert summary["data_cache"]["reference_scores"] == start
        ours, expected = comparable(job.run_dir), comparable(plain)
        assert [r.keys() for r in ours] == [r.keys() for r in expected]
        for got, want in zip(ours, expected, strict=True):
            for key, value in want.items():
                assert got[key] == pytest.approx(value, abs=1e-5), (got["step"], key)
        weights = AutoModelForCausalLM.from_pretrained(job.run_dir / "final").state_dict()
        reference_weights = AutoModelForCausalLM.from_pretrained(plain / "final").state_dict()
        for name, tensor in reference_weights.items():
            assert (weights[name] - tensor).abs().max().item() <= 1e-5, name


@pytest.mark.gpu
def test_fsdp2_on_a_gpu_scores_with_the_prepared_model_and_trains_as_a_plain_run(
    tmp_path, tiny_llama_chat, pairs
):
    """FSDP2 (GPU only: Accelerate runs FSDP on no CPU process group) loads the weights on
    the first process only (cpu_ram_efficient_loading) and shards them in `prepare`, so the
    scores come from the prepared model, as under ZeRO-3; the run is the plain run's to the
    order of the GPU kernels' sums (test_cuda_runs.py's 1e-4)."""
    from test_cuda_runs import losses

    from launch.job import accelerate_command, resolve_job, write_launch_files

    plain = run(tmp_path / "plain", tiny_llama_chat, pairs, tmp_path / "plain-cache")
    fsdp = tmp_path / "fsdp2.yaml"
    fsdp.write_text(yaml.safe_dump({"device": "gpu", "precision": "no", "backend": "fsdp"}))
    argv = preference_config(
        tmp_path / "fsdp", tiny_llama_chat, pairs["train"], **PRECOMPUTE,
        **{"data.validation": pairs["data.validation"], "train.max_steps": 4,
           "eval.every_steps": 2, "eval.batch_size": 2},
    )  # fmt: skip
    job = resolve_job(argv[0], str(fsdp), argv[1:])
    config_file, _ = write_launch_files(job)
    command = accelerate_command(job, config_file, "0", "127.0.0.1", "29480")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((job.run_dir / "run_summary.json").read_text())
    assert summary["distributed_type"] == "FSDP"
    assert summary["data_cache"]["reference_scores"] == "built"
    assert losses(job.run_dir) == pytest.approx(losses(plain), rel=1e-4)
