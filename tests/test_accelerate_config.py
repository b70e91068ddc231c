"""launch.accelerate_config under FSDP2: the written accelerate config, read back the way
`accelerate launch` reads it (its own argument parser, config-file defaults and
`prepare_multi_gpu_env`), gives Accelerate's FullyShardedDataParallelPlugin and
ParallelismConfig the sharding the profile names; strategies FSDP2 can't run are refused."""

from __future__ import annotations

import logging

import pytest
import yaml

from launch.job import resolve_job, write_launch_files
from trainer.errors import UserError

NODE = 8  # processes per node of the profiles below


def fsdp_job(tmp_path, run_config, strategy: str, nodes: int = 1, per_node: int = NODE):
    """A GPU FSDP job on `nodes` x `per_node` processes with `strategy`."""
    profile = tmp_path / f"fsdp-{strategy}.yaml"
    settings = {
        "device": "gpu",
        "nodes": nodes,
        "processes_per_node": per_node,
        "backend": "fsdp",
        "precision": "bf16",
        "fsdp": {"sharding_strategy": strategy},
    }
    profile.write_text(yaml.safe_dump(settings))
    batch = {"global_batch_size": 4 * nodes * per_node, "micro_batch_size": 4}
    return resolve_job(str(run_config("mlm", train=batch)), str(profile), [])


def launcher_environment(job) -> dict[str, str]:
    """The FSDP_* / PARALLELISM_CONFIG_* variables `accelerate launch --config_file` hands
    to the training processes for this job's written config (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config_file, _ = write_launch_files(job)
    argv = ["--config_file", str(config_file), "--machine_rank", "0"]
    argv += ["--main_process_ip", "127.0.0.1", "--main_process_port", "29500"]
    args = launch_command_parser().parse_args([*argv, "-m", "trainer", "train", "x.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    prefixes = ("FSDP_", "PARALLELISM_CONFIG_", "ACCELERATE_USE_")
    return {key: value for key, value in env.items() if key.startswith(prefixes)}


def plugins_from(env: dict[str, str], monkeypatch, caplog):
    """Accelerate's FSDP plugin and parallelism config, built from the environment as the
    training processes' Accelerator builds them; FSDP2 deprecation warnings fail."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import FullyShardedDataParallelPlugin

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.WARNING):
        plugin = FullyShardedDataParallelPlugin()
    assert "FSDP2" not in caplog.text, caplog.text
    parallelism = None
    if env.get("ACCELERATE_USE_PARALLELISM_CONFIG") == "true":
        parallelism = ParallelismConfig()
    return plugin, parallelism


@pytest.mark.parametrize(
    ("strategy", "reshard_after_forward"), [("FULL_SHARD", True), ("SHARD_GRAD_OP", False)]
)
def test_fsdp2_reshards_as_the_strategy_says(
    tmp_path, run_config, monkeypatch, caplog, strategy, reshard_after_forward
):
    job = fsdp_job(tmp_path, run_config, strategy)
    plugin, parallelism = plugins_from(launcher_environment(job), monkeypatch, caplog)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is reshard_after_forward
    assert plugin.sharding_strategy is None  # FSDP1's key: not written, not read
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is True
    assert parallelism is None  # one mesh dimension: shard over the whole world


def test_hybrid_shard_replicates_across_nodes_and_shards_within_one(
    tmp_path, run_config, monkeypatch, caplog
):
    job = fsdp_job(tmp_path, run_config, "HYBRID_SHARD", nodes=2)
    plugin, parallelism = plugins_from(launcher_environment(job), monkeypatch, caplog)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert (parallelism.dp_replicate_size, parallelism.dp_shard_size) == (2, NODE)
    assert parallelism.total_size == job.profile.world_size
    # fully_shard gets the 2-D mesh: replicate over dp_replicate, shard over dp_shard
    assert parallelism.fsdp_dim_names == ["dp_replicate", "dp_shard_cp"]


def test_only_keys_fsdp2_reads_are_written(tmp_path, run_config):
    config_file, _ = write_launch_files(fsdp_job(tmp_path, run_config, "FULL_SHARD"))
    written = yaml.safe_load(config_file.read_text())["fsdp_config"]
    obsolete = {  # FSDP1-only: the plugin warns about or ignores them under fsdp_version 2
        "fsdp_sharding_strategy",
        "fsdp_sync_module_states",
        "fsdp_use_orig_params",
        "fsdp_backward_prefetch",
        "fsdp_forward_prefetch",
    }
    assert written["fsdp_version"] == 2 and not obsolete & set(written)


@pytest.mark.parametrize(
    ("strategy", "per_node", "fragment"),
    [
        ("NO_SHARD", NODE, "NO_SHARD has no FSDP2 equivalent"),
        ("HYBRID_SHARD", 1, "HYBRID_SHARD shards within a node"),
    ],
)
def test_strategies_fsdp2_cannot_run_are_refused(
    tmp_path, run_config, strategy, per_node, fragment
):
    with pytest.raises(UserError) as caught:
        fsdp_job(tmp_path, run_config, strategy, nodes=2, per_node=per_node)
    message = str(caught.value)
    assert "\n" not in message and "fsdp.sharding_strategy: " in message
    assert fragment in message and "backend: ddp" in message
