"""Cluster profiles: every shipped one loads, and a bad one is rejected in one line naming
its key (misspelled keys with the closest valid name)."""

from __future__ import annotations

import pytest
import yaml

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
