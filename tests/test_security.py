"""What a run must not leak, load or leave open: secret config values are redacted (bare
`token`, `password`, `secret` too) but label names never are; a checkpoint from outside
the run is loaded only when the user says so (it unpickles); nothing a run writes is
world-writable, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from conftest import reset_accelerate

from trainer.cli import main
from trainer.config import dump_yaml, load_config, to_dict
from trainer.errors import UserError
from trainer.run.resume import changed_keys, checkpoint_dir
from trainer.security import no_world_write

TINY = {
    "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2},
    "eval": {"every_steps": 0},
    "log": {"trackers": []},
    "checkpoint": {"every_steps": 1, "keep_last": 2},
}


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


# --- redaction ---------------------------------------------------------------------------


def test_bare_secret_keys_are_redacted_in_the_saved_config(run_config):
    overrides = {"token": "hf_bare", "password": "pw_bare", "secret": "s_bare"}
    overrides |= {"hub_token": "hf_suffixed", "hidden_dropout_prob": 0.0}
    config = run_config("mlm", model={"config_overrides": overrides})
    text = dump_yaml(load_config(config))
    for value in ("hf_bare", "pw_bare", "s_bare", "hf_suffixed"):
        assert value not in text
    saved = yaml.safe_load(text)["model"]["config_overrides"]
    assert saved["hidden_dropout_prob"] == 0.0, "other keys are kept"
    assert saved["token"] == "<redacted>"


def test_label_names_are_never_redacted_so_a_changed_class_weight_is_seen(run_config):
    before = load_config(run_config("classification", data={"class_weights": {"spam_key": 1.0}}))
    after = load_config(run_config("classification", data={"class_weights": {"spam_key": 5.0}}))
    assert to_dict(after)["data"]["class_weights"] == {"spam_key": 5.0}
    assert changed_keys(to_dict(before), to_dict(after)) == ["data.class_weights.spam_key"]


# --- train.resume=PATH from outside the run ----------------------------------------------


def test_resume_from_outside_the_run_needs_resume_trusted(run_config, tmp_path, capsys):
    config = run_config("mlm", **TINY)
    elsewhere = tmp_path / "someone-else" / "checkpoints" / "step-00000001"
    assert cli("train", config, f"train.resume={elsewhere}") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: train.resume: {elsewhere} is outside")
    assert "train.resume_trusted=true" in lines[0]
    assert not (tmp_path / "run").exists(), "refused before anything is written"
    # confirmed: the check passes (and the missing folder is what is reported then)
    load_config(config, [f"train.resume={elsewhere}", "train.resume_trusted=true"])
    inside = checkpoint_dir(tmp_path / "run", 1)
    load_config(config, [f"train.resume={inside}"])
    with pytest.raises(UserError, match="outside output_dir"):  # `..` does not get out
        load_config(config, [f"train.resume={tmp_path / 'run' / '..' / 'x'}"])


# --- permissions --------------------------------------------------------------------------


def world_writable(run_dir: Path) -> list[str]:
    paths = [run_dir, *run_dir.rglob("*")]
    return [str(p) for p in paths if not p.is_symlink() and p.stat().st_mode & stat.S_IWOTH]


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_a_run_writes_nothing_world_writable_and_keeps_the_umask(run_config, tmp_path, umask):
    config = run_config("mlm", **TINY)
    previous = os.umask(umask)
    try:
        assert cli("train", config) == 0
        assert os.umask(umask) == umask, "the user's umask is restored after the command"
    finally:
        os.umask(previous)
    run_dir = tmp_path / "run"
    assert checkpoint_dir(run_dir, 2).is_dir() and (run_dir / "final").is_dir()
    assert world_writable(run_dir) == []
    if umask == 0o077:  # respected: nothing for group or others either
        modes = [p.stat().st_mode for p in [run_dir, *run_dir.rglob("*")]]
        assert all(mode & 0o077 == 0 for mode in modes)
    else:  # only o-w is added: the group keeps its write bit
        assert stat.S_IMODE(checkpoint_dir(run_dir, 2).stat().st_mode) == 0o775


def test_no_world_write_adds_only_o_w_and_restores_the_umask(tmp_path):
    previous = os.umask(0o020)
    try:
        with no_world_write():
            (tmp_path / "d").mkdir()
            (tmp_path / "f").write_text("x")
        assert os.umask(0o020) == 0o020
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_weights_get_the_mode_of_the_files_beside_them(run_config, tmp_path):
    """safetensors writes its files 0600 (safetensors#782): another user could read a
    model's config but not its weights."""
    config = run_config("mlm", **TINY)
    previous = os.umask(0o022)
    try:
        assert cli("train", config) == 0
    finally:
        os.umask(previous)
    run_dir = tmp_path / "run"
    weights = [*run_dir.rglob("*.safetensors")]
    assert {p.parent for p in weights} >= {run_dir / "final", checkpoint_dir(run_dir, 2)}
    assert {stat.S_IMODE(p.stat().st_mode) for p in weights} == {0o644}
