"""`trainer plan`: the batch arithmetic, the steps, the exact DeepSpeed / FSDP settings, and
the memory estimate checked against hand arithmetic on the tiny BERT; bad run config x
profile combinations rejected in one line naming each key."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml

from launch.accelerate_config import deepspeed_config, fsdp_settings
from launch.job import resolve_job
from launch.plan import QLORA_BYTES, human_bytes, make_plan, render
from trainer.cli import main
from trainer.data.read import TEXT

WORLD = 8  # the 8gpu-* profiles
BATCH_32 = {"global_batch_size": 32}  # micro batch 4 x 8 processes
# The tiny BERT (tests/tiny_models.py): hidden 32, 2 layers, 2 heads, intermediate 64.
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 32, 2, 2, 64


def safetensors_parameters(folder) -> int:
    """Parameters stored in a model folder (tied weights are stored once)."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        names = handle.keys()
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in names)


def run_plan(capsys, *argv) -> str:
    code = main(["plan", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def expect_user_error_line(capsys, argv, *fragments: str) -> str:
    """Exit code 2 and one `error:` line holding every fragment; returns the line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err.strip()


def json_after(text: str, header: str) -> dict:
    """The JSON object printed after the line starting with `header`."""
    start = text.index("{", text.index(header))
    return json.JSONDecoder().raw_decode(text[start:])[0]


def rows_by_name(plan) -> dict:
    return {row.strategy: row for row in plan.memory}


# --- batch and steps --------------------------------------------------------------------


def test_batch_arithmetic_and_steps_of_a_classification_run(capsys, run_config):
    config = run_config("classification", train={"global_batch_size": 32, "micro_batch_size": 2})
    plan = make_plan(str(config), "8gpu-zero2", [])
    assert plan.accumulation == 2  # 32 / (2 x 8)
    assert plan.tokens_per_step == 32 * 32  # global batch x data.max_length
    assert plan.data.examples == 192  # one per row of sentiment_train.csv
    assert (plan.steps_per_epoch, plan.total_steps) == (6, 6)  # 192 // 32, 1 epoch
    out = run_plan(capsys, config, "--cluster", "8gpu-zero2", "train.epochs=3")
    assert "world size          8 (1 node(s) x 8 processes, gpu, deepspeed)" in out
    assert "accumulation steps  2" in out
    assert "global batch        32 (= 2 x 2 x 8)" in out
    assert "tokens per step     1,024" in out and "an upper bound" in out
    assert "total steps         18 (3 epochs x 6 per epoch)" in out


def test_validation_split_and_max_steps_change_the_steps(run_config):
    config = run_config("classification")
    overrides = ["data.validation=null", "data.validation_split=0.25", "train.max_steps=5"]
    plan = make_plan(str(config), "cpu-debug", overrides)
    assert plan.data.examples == 144  # 192 - round(0.25 x 192)
    assert (plan.steps_per_epoch, plan.total_steps) == (18, 5)


def test_packed_lm_examples_are_the_encoded_blocks(run_config, bert_tokenizer):
    from trainer.config import DataConfig
    from trainer.data.encode import pack_for_mlm
    from trainer.data.read import read_split

    config = run_config("mlm", train=BATCH_32)
    plan = make_plan(str(config), "cpu-2proc", [])
    raw = yaml.safe_load(config.read_text())
    split = read_split(raw["data"]["train"], "data.train", TEXT, DataConfig(max_length=32))
    blocks = len(pack_for_mlm(split, bert_tokenizer, 32))
    assert plan.data.examples == blocks
    assert plan.total_steps == blocks // 32


HUB_MISS = (
    "model.name_or_path: 'no-org/no-model' is neither a local folder nor reachable on the hub"
)


def test_a_model_or_data_that_cannot_be_read_is_unknown(capsys, run_config):
    config = run_config("mlm", train=BATCH_32)
    out = run_plan(capsys, config, "--cluster", "1gpu", "model.name_or_path=no-org/no-model")
    assert f"training examples   unknown ({HUB_MISS}" in out
    assert "total steps         unknown" in out
    assert f"memory per device   unknown ({HUB_MISS}" in out


def test_fine_tuning_rows_are_counted_without_the_tokenizer(run_config):
    config = run_config("classification")
    plan = make_plan(str(config), "1gpu", ["model.name_or_path=no-org/no-model"])
    assert (plan.data.examples, plan.total_steps) == (192, 24)
    assert plan.params is None and HUB_MISS in plan.params_unknown


# --- backend settings: exactly what `trainer launch` writes ----------------------------------


def test_printed_deepspeed_json_is_the_launch_one(capsys, run_config):
    config = run_config("mlm", train={"global_batch_size": 64, "micro_batch_size": 2})
    for profile in ("8gpu-zero2", "8gpu-zero3-offload"):
        out = run_plan(capsys, config, "--cluster", profile)
        printed = json_after(out, "DeepSpeed config")
        job = resolve_job(str(config), profile, [])
        assert printed == deepspeed_config(job.cfg, job.profile, job.precision)
        micro = printed["train_micro_batch_size_per_gpu"]
        assert printed["train_batch_size"] == micro * printed["gradient_accumulation_steps"] * 8
        assert printed["gradient_accumulation_steps"] == 4


def test_printed_fsdp_settings_are_the_launch_ones(capsys, run_config):
    config = run_config("mlm", train=BATCH_32)
    out = run_plan(capsys, config, "--cluster", "8gpu-fsdp")
    assert json_after(out, "FSDP settings") == fsdp_settings(
        resolve_job(str(config), "8gpu-fsdp", []).profile
    )
    assert "DeepSpeed config" not in out


def fsdp_profile(tmp_path, strategy: str, nodes: int = 1) -> str:
    path = tmp_path / f"fsdp-{strategy}.yaml"
    settings = {"device": "gpu", "nodes": nodes, "processes_per_node": 8, "backend": "fsdp"}
    path.write_text(yaml.safe_dump({**settings, "fsdp": {"sharding_strategy": strategy}}))
    return str(path)


def test_fsdp2_rows_are_what_runs(capsys, run_config, tiny_bert, tmp_path):
    """SHARD_GRAD_OP runs as reshard_after_forward false (all gathered weights at the
    peak), HYBRID_SHARD on a 2-D mesh sharded over the 8 processes of a node, not 16."""
    n = safetensors_parameters(tiny_bert)
    config = str(run_config("mlm", train={"global_batch_size": 64}))
    out = run_plan(capsys, config, "--cluster", fsdp_profile(tmp_path, "SHARD_GRAD_OP"))
    assert json_after(out, "FSDP settings")["fsdp_reshard_after_forward"] is False
    row = rows_by_name(make_plan(config, fsdp_profile(tmp_path, "SHARD_GRAD_OP"), []))
    assert (row["fsdp SHARD_GRAD_OP"].weights, row["fsdp SHARD_GRAD_OP"].grads) == (
        4 * n,  # fp32 on a profile without a precision
        4 * n / WORLD,
    )
    hybrid = fsdp_profile(tmp_path, "HYBRID_SHARD", nodes=2)
    out = run_plan(capsys, config, "--cluster", hybrid)
    assert json_after(out, "parallelism_config") == {
        "parallelism_config_dp_replicate_size": 2,
        "parallelism_config_dp_shard_size": 8,
    }
    row = rows_by_name(make_plan(config, hybrid, []))["fsdp HYBRID_SHARD"]
    assert (row.weights, row.optimizer) == (4 * n / 8, 8 * n / 8)


# --- memory: bytes per parameter -----------------------------------------------------------


def test_parameter_count_matches_the_weights_file(run_config, tiny_bert):
    plan = make_plan(str(run_config("mlm", train=BATCH_32)), "8gpu-ddp", [])
    assert plan.params.total == plan.params.trainable == safetensors_parameters(tiny_bert)
    assert (plan.params.hidden, plan.params.layers, plan.params.heads) == (HIDDEN, LAYERS, HEADS)


@pytest.mark.parametrize("profile", ["8gpu-ddp", "8gpu-zero2", "8gpu-zero3-offload"])
def test_full_fine_tuning_bytes_per_parameter(run_config, tiny_bert, profile):
    n = safetensors_parameters(tiny_bert)
    plan = make_plan(str(run_config("mlm", train=BATCH_32)), profile, [])  # bf16 on these profiles
    expected = {  # DeepSpeed: weights 2, grads 2, optimizer 4 master + 8 Adam, sharded over 8;
        # autocast (ddp, fsdp): fp32 weights 4, grads 4, Adam 8, no master copy
        "ddp": (4 * n, 4 * n, 8 * n),
        "zero1": (2 * n, 2 * n, 12 * n / WORLD),
        "zero2": (2 * n, 2 * n / WORLD, 12 * n / WORLD),
        "zero3": (2 * n / WORLD, 2 * n / WORLD, 12 * n / WORLD),
        "zero3+offload": (0, 0, 0),  # the gradients go to the host with the optimizer
        "fsdp": (4 * n / WORLD, 4 * n / WORLD, 8 * n / WORLD),
    }
    rows = rows_by_name(plan)
    assert list(rows) == list(expected)
    for name, (weights, grads, optimizer) in expected.items():
        assert (rows[name].weights, rows[name].grads, rows[name].optimizer) == (
            weights,
            grads,
            optimizer,
        ), name
    assert plan.chosen == {"8gpu-ddp": "ddp", "8gpu-zero2": "zero2"}.get(profile, "zero3+offload")


def test_fp32_has_no_master_copy(run_config, tiny_bert):
    n = safetensors_parameters(tiny_bert)
    plan = make_plan(str(run_config("mlm", train=BATCH_32)), "8gpu-ddp", ["train.precision=no"])
    ddp = rows_by_name(plan)["ddp"]
    assert (ddp.weights, ddp.grads, ddp.optimizer) == (4 * n, 4 * n, 8 * n)


def test_lora_trains_only_the_adapters(run_config, tiny_bert):
    n = safetensors_parameters(tiny_bert)
    adapters = LAYERS * 2 * 8 * (HIDDEN + HIDDEN)  # query and value, r=8, r*(d_in + d_out)
    plan = make_plan(str(run_config("mlm", train=BATCH_32)), "8gpu-zero2", ["peft.method=lora"])
    assert (plan.params.total, plan.params.trainable) == (n, adapters)
    rows = rows_by_name(plan)
    assert (rows["ddp"].weights, rows["ddp"].grads, rows["ddp"].optimizer) == (
        2 * n + 4 * adapters,  # the frozen base in bf16, the adapters in fp32
        4 * adapters,
        8 * adapters,
    )
    assert rows["zero3"].weights == 2 * (n + adapters) / WORLD  # the engine casts it all


def test_model_dtype_bf16_trains_without_a_master_copy(run_config, tiny_bert):
    n = safetensors_parameters(tiny_bert)
    config = str(run_config("mlm", train=BATCH_32))
    rows = rows_by_name(make_plan(config, "8gpu-ddp", ["model.dtype=bf16"]))
    assert (rows["ddp"].weights, rows["ddp"].grads, rows["ddp"].optimizer) == (2 * n, 2 * n, 4 * n)
    assert rows["zero2"].optimizer == 12 * n / WORLD  # DeepSpeed keeps its fp32 master copy


def test_model_dtype_auto_reads_the_checkpoint_dtype(run_config, tiny_bert, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_bert, tmp_path / "bf16-bert")
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "dtype": "bfloat16"}))
    n = safetensors_parameters(tiny_bert)
    config = str(run_config("mlm", train=BATCH_32, model={"name_or_path": str(folder)}))
    for dtype, width in (("auto", 2), ("fp32", 4)):
        plan = make_plan(config, "8gpu-ddp", [f"model.dtype={dtype}", "train.precision=no"])
        assert rows_by_name(plan)["ddp"].weights == width * n, dtype


@pytest.mark.parametrize("cluster", ["8gpu-fsdp", "8gpu-zero3-offload"])
def test_sharded_qlora_divides_the_4bit_base_over_the_processes(run_config, tiny_bert, cluster):
    n = safetensors_parameters(tiny_bert)
    adapters = LAYERS * 2 * 8 * (HIDDEN + HIDDEN)
    quantized = LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE)
    config = str(run_config("mlm", train=BATCH_32))
    plan = make_plan(config, cluster, ["peft.method=qlora"])
    rows = rows_by_name(plan)
    # fsdp (autocast): the rest of the base in the storage dtype bf16, the adapters in fp32
    fsdp = (2 * (n - quantized) + 4 * adapters + QLORA_BYTES * quantized) / WORLD
    assert rows["fsdp"].weights == pytest.approx(fsdp)
    zero3 = (2 * (n + adapters - quantized) + QLORA_BYTES * quantized) / WORLD
    assert rows["zero3"].weights == pytest.approx(zero3)


def test_qlora_stores_the_linear_weights_in_4_bits(run_config, tiny_bert):
    n = safetensors_parameters(tiny_bert)
    adapters = LAYERS * 2 * 8 * (HIDDEN + HIDDEN)
    # per layer: query, key, value, attention output (h x h), intermediate and output (h x 4h);
    # the MLM head (`cls.*`) stays in full precision
    quantized = LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE)
    plan = make_plan(str(run_config("mlm", train=BATCH_32)), "8gpu-zero2", ["peft.method=qlora"])
    assert plan.params.frozen_quantized == quantized
    zero2 = rows_by_name(plan)["zero2"]
    assert zero2.weights == 2 * (n + adapters - quantized) + QLORA_BYTES * quantized
    assert (zero2.grads, zero2.optimizer) == (2 * adapters / WORLD, 12 * adapters / WORLD)


def test_activations_follow_the_documented_formula(run_config):
    plan = make_plan(
        str(run_config("mlm", train=BATCH_32)), "8gpu-ddp", ["train.micro_batch_size=1"]
    )
    b, s, vocab = 1, 32, plan.params.vocab
    layer = 34 * s * b * HIDDEN + 5 * HEADS * s * s * b
    assert plan.memory[0].activations == LAYERS * layer + s * b * vocab * 4
    checkpointed = make_plan(
        str(run_config("mlm", train=BATCH_32)),
        "8gpu-ddp",
        ["train.micro_batch_size=1", "train.gradient_checkpointing=true"],
    )
    assert (
        checkpointed.memory[0].activations
        == LAYERS * 2 * s * b * HIDDEN + layer + s * b * vocab * 4
    )


def test_the_table_marks_the_chosen_strategy(capsys, run_config):
    out = run_plan(capsys, run_config("mlm", train=BATCH_32), "--cluster", "8gpu-zero3-offload")
    marked = [
        line.split()[1] for line in out.splitlines() if line.startswith("* ") and "  " in line
    ]
    assert marked[0] == "zero3+offload"
    assert "parameters          30,752 (BertForMaskedLM)" in out


def test_the_table_prints_host_memory_per_node(capsys, run_config, tiny_bert):
    n = safetensors_parameters(tiny_bert)
    out = run_plan(capsys, run_config("mlm", train=BATCH_32), "--cluster", "8gpu-zero3-offload")
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("strategy"))
    assert header.split()[-1] == "host/node"
    chosen = next(line for line in lines if line.startswith("* zero3+offload "))
    # the node's 8 shards: bf16 weights 2 + offloaded optimizer 16 (fp32 master, m, v, grads)
    assert chosen.split()[-2:] == human_bytes(18 * n).split()


def test_a_strategy_outside_the_alternatives_gets_its_own_row(tmp_path, run_config):
    profile = tmp_path / "z2off.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "device": "gpu",
                "processes_per_node": 8,
                "backend": "deepspeed",
                "zero_stage": 2,
                "offload_optimizer": True,
                "precision": "bf16",
            }
        )
    )
    plan = make_plan(str(run_config("mlm", train=BATCH_32)), str(profile), [])
    assert plan.chosen == "zero2+offload_optimizer"
    assert plan.memory[-1].strategy == plan.chosen and plan.memory[-1].optimizer == 0


# --- combinations a profile can't run ---------------------------------------------------------


def fsdp_checkpointing_profile(tmp_path) -> str:
    path = tmp_path / "fsdp-ckpt.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "device": "gpu",
                "processes_per_node": 8,
                "backend": "fsdp",
                "precision": "bf16",
                "fsdp": {"activation_checkpointing": True},
            }
        )
    )
    return str(path)


@pytest.mark.parametrize(
    ("cluster", "overrides", "fragments"),
    [
        ("cpu-debug", ["train.precision=fp16"], ["train.precision: fp16 needs CUDA"]),
        (
            "8gpu-ddp",
            ["train.global_batch_size=12"],
            ["train.global_batch_size: 12 is not divisible"],
        ),
        (
            "cpu-debug",
            ["train.global_batch_size=256", "train.micro_batch_size=4"],
            ["train.global_batch_size: 256 is more than the 192 training examples"],
        ),
    ],
)
def test_bad_combinations_are_rejected_naming_the_key(
    capsys, run_config, cluster, overrides, fragments
):
    config = run_config("classification", train={"global_batch_size": 32, "micro_batch_size": 4})
    expect_user_error_line(capsys, ["plan", config, "--cluster", cluster, *overrides], *fragments)


def test_double_activation_checkpointing(capsys, run_config, tmp_path):
    config = run_config("mlm", train={"global_batch_size": 32})
    argv = ["plan", config, "--cluster", fsdp_checkpointing_profile(tmp_path)]
    expect_user_error_line(
        capsys,
        [*argv, "train.gradient_checkpointing=true"],
        "train.gradient_checkpointing:",
        "fsdp.activation_checkpointing",
    )
    assert "tokens per step" in run_plan(capsys, *argv[1:])  # either one alone is fine


def test_every_problem_in_one_line(capsys, run_config, tmp_path):
    config = run_config("classification", train={"global_batch_size": 12})  # 8 processes
    line = expect_user_error_line(
        capsys,
        [
            "plan",
            config,
            "--cluster",
            fsdp_checkpointing_profile(tmp_path),
            "model.dtype=fp16",
            "train.gradient_checkpointing=true",
        ],
    )
    for key in ("train.global_batch_size:", "model.dtype:", "train.gradient_checkpointing:"):
        assert key in line


def test_a_bad_profile_is_a_one_line_error(capsys, run_config, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("backend: ddp\noffload_optimizer: true\n")
    expect_user_error_line(
        capsys,
        ["plan", run_config("mlm", train=BATCH_32), "--cluster", path],
        "offload_optimizer: offloading needs backend deepspeed",
    )


def test_preference_counts_the_frozen_reference_copy_and_two_sequences_a_pair(
    tmp_path, tiny_llama_chat
):
    """Full-fine-tuning DPO holds a second, frozen model (its weights again, unsharded);
    under LoRA the reference is the base with the adapter off, and SimPO has none. A pair
    is two sequences: the activations of a micro batch double."""
    from test_preference import pair_rows

    from trainer.tasks.registry import TASKS

    rows = pair_rows(64, 0)
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"task: preference\nmodel: {{name_or_path: {tiny_llama_chat}}}\n"
        f"data: {{train: {train}, cache_dir: null}}\n"
        "train: {global_batch_size: 32, micro_batch_size: 4}\n"
    )
    full = make_plan(str(config), "8gpu-ddp", [])
    n = full.params.total
    lora = make_plan(str(config), "8gpu-ddp", ["peft.method=lora"])
    simpo = make_plan(str(config), "8gpu-ddp", ["preference.loss=simpo"])
    assert rows_by_name(full)["ddp"].weights == 4 * n + 4 * n
    assert rows_by_name(simpo)["ddp"].weights == 4 * n
    zero3 = rows_by_name(full)["zero3"].weights - rows_by_name(simpo)["zero3"].weights
    assert zero3 == 4 * n  # the copy whole, in fp32 as it loads
    # the bf16 base and the fp32 adapters, nothing more
    lora_params = lora.params
    expected = 2 * lora_params.frozen_other + 4 * lora_params.trainable
    assert rows_by_name(lora)["ddp"].weights == expected
    sft = dataclasses.replace(TASKS["preference"], sequences_per_example=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(TASKS, "preference", sft)
        single = make_plan(str(config), "8gpu-ddp", ["preference.loss=simpo"])
    assert rows_by_name(simpo)["ddp"].activations == 2 * rows_by_name(single)["ddp"].activations
    assert "weights include a frozen reference copy" in render(full)
    assert "no reference copy" in render(lora)
