"""Cluster profiles: every shipped one loads, also by name from a wheel (they are package
data), and a bad one is rejected in one line naming its key (misspelled keys with the
closest valid name)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from conftest import REPO

from launch.profiles import PROFILE_DIR, load_profile
from trainer.errors import UserError

SHIPPED = sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))


def write_profile(tmp_path, **values) -> str:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def rejected(tmp_path, **values) -> str:
    with pytest.raises(UserError) as caught:
        load_profile(write_profile(tmp_path, **values))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.world_size == profile.nodes * profile.processes_per_node >= 1
    first = (PROFILE_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# trainer ") and f"--cluster {name}" in first


def test_a_wheel_ships_the_profiles_and_finds_them_by_name(tmp_path):
    """A non-editable install has no checkout to look in: build a wheel from a copy of the
    sources (the checkout stays clean), unpack it as pip installs a pure-Python wheel, and
    load a profile by name from there, in a process where the unpacked copy comes first."""
    source = tmp_path / "source"
    for folder in ("trainer", "launch"):
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheel_dir, site = tmp_path / "dist", tmp_path / "site"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    built = subprocess.run([*build, "-w", wheel_dir, source], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheel_dir.glob("steadytrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert {f"launch/clusters/{name}.yaml" for name in SHIPPED} <= set(archive.namelist())
        archive.extractall(site)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from launch.profiles import PROFILE_DIR, load_profile; "
        "print(PROFILE_DIR); print(load_profile('8gpu-zero2').zero_stage)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe, site], cwd=tmp_path, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.splitlines() == [str(site.resolve() / "launch" / "clusters"), "2"]


def test_the_shipped_profiles_cover_each_backend():
    backends = {load_profile(name).backend for name in SHIPPED}
    assert backends == {"ddp", "deepspeed", "fsdp"}


def test_a_profile_by_path(tmp_path):
    profile = load_profile(write_profile(tmp_path, device="gpu", processes_per_node=4))
    assert (profile.name, profile.world_size, profile.backend) == ("profile", 4, "ddp")


def test_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(UserError, match=r"--cluster: no profile 'nope' \(known: .*8gpu-zero2"):
        load_profile("nope")


def test_misspelled_key_gets_did_you_mean(tmp_path):
    message = rejected(tmp_path, backend="deepspeed", zero_stag=2)
    assert "unknown key 'zero_stag' (did you mean 'zero_stage'?)" in message


def test_misspelled_nested_key_gets_did_you_mean(tmp_path):
    message = rejected(tmp_path, backend="fsdp", fsdp={"sharding_stratgy": "FULL_SHARD"})
    assert "unknown key 'fsdp.sharding_stratgy' (did you mean 'fsdp.sharding_strategy'?)" in (
        message
    )


def test_zero_stage_without_deepspeed(tmp_path):
    message = rejected(tmp_path, backend="ddp", zero_stage=2)
    assert "zero_stage: only with backend deepspeed (backend is ddp)" in message


def test_deepspeed_without_a_zero_stage(tmp_path):
    assert "zero_stage: DeepSpeed needs 1, 2 or 3, got 0" in rejected(tmp_path, backend="deepspeed")


def test_offload_without_deepspeed(tmp_path):
    message = rejected(tmp_path, backend="fsdp", offload_optimizer=True)
    assert "offload_optimizer: offloading needs backend deepspeed" in message


def test_offload_params_without_stage_3(tmp_path):
    message = rejected(tmp_path, backend="deepspeed", zero_stage=2, offload_params=True)
    assert "offload_params: parameter offload needs zero_stage 3" in message


def test_every_problem_is_reported_at_once(tmp_path):
    message = rejected(
        tmp_path, device="tpu", nodes=0, backend="ddp", zero_stage=3, precision="fp8"
    )
    for key in ("device:", "nodes:", "zero_stage:", "precision:"):
        assert key in message
    assert message.startswith("cluster profile profile.yaml: ")


@pytest.mark.parametrize(
    "key, values",
    [
        ("slurm.partition", {"slurm": {"partition": "gpu\necho pwned"}}),
        ("slurm.account", {"slurm": {"account": "proj\r"}}),
        ("slurm.qos", {"slurm": {"qos": "high\nrm -rf ~"}}),
        ("slurm.constraint", {"slurm": {"constraint": "a100\n"}}),
        ("slurm.gres", {"slurm": {"gres": "gpu:8\n#"}}),
        ("slurm.time", {"slurm": {"time": "1:00:00\ntouch x"}}),
        ("slurm.extra[1]", {"slurm": {"extra": ["--exclusive", "--mem=0\necho pwned"]}}),
        ("env.NCCL_DEBUG", {"env": {"NCCL_DEBUG": "INFO\necho pwned"}}),
    ],
)
def test_a_control_character_in_a_script_value_is_refused(tmp_path, key, values):
    message = rejected(tmp_path, **values)
    assert f"{key}: " in message and "control character" in message


@pytest.mark.parametrize("name", ["1ABC", "A B", "X;echo", "A\nB", "A-B", ""])
def test_env_keys_must_be_shell_variable_names(tmp_path, name):
    message = rejected(tmp_path, env={name: "1"})
    assert f"env: {name!r} is not a shell variable name" in message


def test_shell_variable_names_and_plain_values_load(tmp_path):
    env = {"_X": "a b", "NCCL_DEBUG": "INFO", "HF_TOKEN": "hf_abc"}
    profile = load_profile(write_profile(tmp_path, env=env, slurm={"partition": "gpu a"}))
    assert profile.env == env
