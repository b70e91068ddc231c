"""`trainer plan`'s memory table against DeepSpeed's own estimator, on a Llama-7B-shaped
model (LlamaConfig's defaults) counted on the meta device: the host memory per node of
every ZeRO row within 15% of `estimate_zero{2,3}_model_states_mem_needs`, and the model
states per GPU as well, where the two count the same things."""

from __future__ import annotations

import pytest
import torch
import yaml

from launch.plan import make_plan

GPUS = 8
TOLERANCE = 0.15
# Our table counts the states themselves, like its device columns; DeepSpeed multiplies its
# host number by additional_buffer_factor (1.5 by default) as a margin for pinned buffers
# and the like, which the plan's footer mentions. So the comparison is against factor 1.0.
FACTOR = 1.0


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory):
    """A model folder holding only a Llama-7B config.json, and DeepSpeed's parameter counts
    for that model built on the meta device."""
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama-7b")
    config = LlamaConfig()  # hidden 4096, 32 layers, vocab 32000: 6.7B parameters
    config.save_pretrained(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    _, largest_layer = model_to_params(model)
    # model_to_params de-duplicates tied weights by data_ptr(), which is 0 for every meta
    # tensor; Llama-7B ties none, so the plain sum is DeepSpeed's total
    total = sum(p.numel() for p in model.parameters())
    return folder, total, largest_layer


def zero_profile(folder, stage: int, offload_optimizer=False, offload_params=False) -> str:
    path = folder / f"zero{stage}-{offload_optimizer}-{offload_params}.yaml"
    settings = {"device": "gpu", "processes_per_node": GPUS, "backend": "deepspeed"}
    settings.update(zero_stage=stage, precision="bf16")
    settings.update(offload_optimizer=offload_optimizer, offload_params=offload_params)
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def deepspeed_estimates(total: int, largest_layer: int) -> dict[str, tuple]:
    """(host per node, model states per GPU or None) by DeepSpeed, per plan row: its
    `estimate_zero{2,3}_model_states_mem_needs_all_cold` print, option by option (they call
    these functions); zero_init as `trainer launch` configures ZeRO-3 (zero3_init_flag)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    def zero2(offload: bool) -> tuple[float, float]:
        return estimate_zero2_model_states_mem_needs(total, GPUS, 1, offload, FACTOR)

    def zero3(offload: bool, offload_params: bool) -> tuple[float, float]:
        cpu, gpu, gathered = estimate_zero3_model_states_mem_needs(
            total, largest_layer, GPUS, 1, offload, offload_params, True, FACTOR
        )
        # the plan does not count the layer gathered in flight (its docstring says so)
        return cpu, gpu - gathered

    return {
        # DeepSpeed has a stage-2 estimator only: the host is the same under ZeRO-1 (every
        # process loads the model), the GPU is not (ZeRO-1 keeps whole gradients)
        "zero1": (zero2(False)[0], None),
        "zero2": zero2(False),
        "zero2+offload_optimizer": zero2(True),
        "zero3": zero3(False, False),
        "zero3+offload_optimizer": zero3(True, False),
        "zero3+offload": zero3(True, True),
    }


def test_host_and_gpu_memory_agree_with_deepspeeds_estimator(run_config, llama_7b, tmp_path):
    folder, total, largest_layer = llama_7b
    config = str(
        run_config("clm", model={"name_or_path": str(folder)}, train={"global_batch_size": 32})
    )
    rows = {}
    for stage, offload_optimizer in ((2, True), (3, True)):  # plus the alternatives' rows
        plan = make_plan(config, zero_profile(tmp_path, stage, offload_optimizer), [])
        rows.update({row.strategy: row for row in plan.memory})
    assert plan.params.total == total and plan.params.largest_layer == largest_layer
    for name, (host, gpu) in deepspeed_estimates(total, largest_layer).items():
        row = rows[name]
        assert row.host == pytest.approx(host, rel=TOLERANCE), name
        states = row.weights + row.grads + row.optimizer
        if name == "zero3+offload":  # 0 states on the GPU on both sides
            assert states == gpu == 0, name
        elif gpu is not None:
            assert states == pytest.approx(gpu, rel=TOLERANCE), name
    # the rows DeepSpeed has no estimate for: every process loads (DDP), one per node (FSDP)
    assert rows["ddp"].host == 4 * total * GPUS
    assert rows["fsdp"].host == 4 * total
