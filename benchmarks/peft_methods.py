"""Full fine-tuning vs LoRA vs QLoRA with our engine, and LoRA and QLoRA side by side with
plain `transformers.Trainer` + `peft`: the sentiment job, the same number of optimizer steps
for every run, each a fresh process.

Runs are interleaved (ours full, ours LoRA, Trainer LoRA, ours QLoRA, Trainer QLoRA) so that
a change in background load hits both sides of a pair alike. On CPU, bitsandbytes
dequantizes every 4-bit layer in every pass: QLoRA is here to show that it runs, trains and
matches Trainer + peft, not that it is fast on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks import engine, hf_reference
from benchmarks.common import load_warning
from benchmarks.comparison import LORA, LORA_LR, SENTIMENT, Job, ratios, sides_table
from benchmarks.models import model_path

METHODS = {"full": ("none", 1e-4), "lora": ("lora", LORA_LR), "qlora": ("qlora", LORA_LR)}
SIDE_BY_SIDE = ("lora", "qlora")  # also run with Trainer + peft
STEPS = {False: 30, True: 8}  # full, quick


def run(quick: bool, work_dir: Path) -> dict[str, Any]:
    """Each method with our engine, and right after it, for LoRA and QLoRA, Trainer + peft."""
    ours: dict[str, dict] = {}
    pairs: dict[str, dict] = {}
    base = replace(SENTIMENT, max_steps=STEPS[quick], log_every=1)  # a record per step
    for name, (peft, lr) in METHODS.items():
        job = replace(base, name=name, lr=lr, peft=peft)
        print(f"[peft] {name}: {job.max_steps} steps, lr {lr:g} ...", flush=True)
        ours[name] = engine.run_job(job, model_path(), work_dir)
        if name in SIDE_BY_SIDE:
            hf = hf_reference.run_job(job, model_path(), work_dir)
            pairs[name] = {
                "ours": ours[name],
                "hf": hf,
                "ratio_ours_over_hf": ratios(job, ours[name], hf),
            }
    return {
        "job": asdict(base),  # learning rate and peft: per method
        "lr": {name: lr for name, (_, lr) in METHODS.items()},
        "lora": asdict(LORA),
        "not_quantized": hf_reference.NOT_QUANTIZED,
        "ours": ours,
        "side_by_side": pairs,
    }


def markdown(result: dict[str, Any]) -> str:
    """Settings, our three methods in one table, then each pair with the ratios."""
    job, lora = Job(**result["job"]), result["lora"]
    runs = [*result["ours"].values(), *(p["hf"] for p in result["side_by_side"].values())]
    lines = [
        "## Full fine-tuning vs LoRA vs QLoRA, and LoRA/QLoRA vs Trainer + peft",
        "",
        f"Sentiment classification, all-MiniLM-L6-v2, `{job.train}` → `{job.validation}`, "
        f"max_length {job.max_length}, {job.max_steps} optimizer steps of batch "
        f"{job.batch_size}, seed {job.seed}, fp32, warmup ratio {job.warmup_ratio}, linear "
        f"decay, weight decay {job.weight_decay}, clipping {job.max_grad_norm}, fused AdamW, one "
        "evaluation at the end; each run a fresh process. Step times and samples/s cover the "
        "training loop alone. Peak RSS is the process's own (ru_maxrss from wait4).",
        "",
        f"- LoRA (both sides): r {lora['r']}, alpha {lora['alpha']}, dropout "
        f"{lora['dropout']}, target modules {lora['target_modules']}, modules_to_save "
        f"{lora['modules_to_save']}; QLoRA: NF4, double quantization, fp32 compute, not "
        f"quantized {result['not_quantized']}, prepare_model_for_kbit_training without "
        "gradient checkpointing",
        "- Learning rates: " + ", ".join(f"{k} {v:g}" for k, v in result["lr"].items()),
        *load_warning([max(r["load_before"], r["load_after"]) for r in runs]),
        "",
        "### Our engine: full fine-tuning vs LoRA vs QLoRA",
        "",
        *sides_table(job, result["ours"]),
    ]
    for name, pair in result["side_by_side"].items():
        columns = {"ours": pair["ours"], "Trainer + peft": pair["hf"]}
        lines += ["", f"### {name}: our engine vs transformers.Trainer + peft", ""]
        lines += sides_table(job, columns, pair["ratio_ours_over_hf"])
    qlora = result["side_by_side"].get("qlora")
    if qlora:
        lines += [
            "",
            "Parameter counts unpack 4-bit tensors on both sides (our run_summary.json; "
            "peft's get_nb_trainable_parameters): torch's numel() counts 2 packed weights as "
            f"1, so torch's QLoRA total reads {qlora['hf']['torch_parameters']:,}. The "
            "validation set has 100 reviews: one review is 1 point of accuracy.",
        ]
    return "\n".join(lines)
