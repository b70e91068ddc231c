"""Our engine, driven through its CLI (`python -m trainer train CONFIG key=value ...`) in a
fresh process, and what its run folder says afterwards. Going through the CLI keeps the
benchmarks independent of how the engine is arranged inside."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import ROOT, Measured, read_jsonl, run_measured
from benchmarks.comparison import LORA, Job, side

QUICKSTART = ROOT / "configs" / "quickstart-sentiment-minilm.yaml"


def trainer_command(*args: str, env: Sequence[str] = (), launcher: Sequence[str] = ()) -> list[str]:
    """`python -m trainer ARGS` with this interpreter (an editable install finds the
    worktree's package); `env`: VAR=value settings for it; `launcher`: a module that starts
    the processes (`-m torch.distributed.run --nproc_per_node 2`)."""
    start = [*(["env", *env] if env else []), sys.executable, *launcher]
    return [*start, "-m", "trainer", *args]


def write_config(path: Path, raw: dict) -> Path:
    """A run config as YAML (for the runs whose settings read better as one)."""
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass
class EngineRun:
    """One finished `trainer train`: its cost and its run folder's records."""

    measured: Measured
    run_dir: Path
    records: list[dict]

    @property
    def windows(self) -> list[dict]:
        """The training log windows of metrics.jsonl (not the evaluation records)."""
        return [r for r in self.records if "loss" in r]

    def read(self, name: str) -> dict:
        """A JSON file of the run folder (eval_results.json, run_summary.json)."""
        return json.loads((self.run_dir / name).read_text())


def train(
    run_dir: Path, log: Path, config: Path, overrides: Sequence[str] = (), **start: Sequence[str]
) -> EngineRun:
    """`trainer train CONFIG output_dir=RUN_DIR OVERRIDES` in a fresh process, measured (how
    it starts: `trainer_command`'s keywords); a run folder left by an earlier run (a kept
    --work-dir) is removed first."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = trainer_command("train", str(config), f"output_dir={run_dir}", *overrides, **start)
    measured = run_measured(command, log)
    return EngineRun(measured, run_dir, read_jsonl(run_dir / "metrics.jsonl"))


def job_overrides(job: Job, model: str, cache: Path) -> list[str]:
    """key=value overrides that pin every setting the comparison depends on."""
    overrides = [
        f"task={job.task}",
        f"model.name_or_path={model}",
        f"data.train={job.train}",
        f"data.validation={job.validation}",
        f"data.max_length={job.max_length}",
        f"data.cache_dir={cache}",
        f"train.epochs={job.epochs}",
        f"train.global_batch_size={job.batch_size}",
        f"train.micro_batch_size={job.batch_size}",
        f"train.lr={job.lr}",
        f"train.warmup_ratio={job.warmup_ratio}",
        f"train.weight_decay={job.weight_decay}",
        f"train.max_grad_norm={job.max_grad_norm}",
        "train.scheduler=linear",
        "train.precision='no'",  # quoted: bare `no` is YAML 1.1 for false
        f"train.seed={job.seed}",
        f"eval.batch_size={job.eval_batch_size}",
        "eval.every_steps=1000000000",  # never during training: only the final evaluation
        f"eval.metric={job.metrics[0]}",
        f"log.every_steps={job.log_every}",
        "log.trackers=[]",
        f"peft.method={job.peft}",
        *job.ours_extra,
    ]
    if job.max_steps:
        overrides.append(f"train.max_steps={job.max_steps}")
    if job.peft != "none":
        targets = ",".join(LORA.target_modules)
        overrides += [
            f"peft.r={LORA.r}",
            f"peft.alpha={LORA.alpha}",
            f"peft.dropout={LORA.dropout}",
        ]
        overrides.append(f"peft.target_modules=[{targets}]")
    return overrides


def run_job(job: Job, model: str, work_dir: Path) -> dict[str, Any]:
    """Our side of a comparison: the quickstart config with `job_overrides`; one side's
    numbers (see `comparison.side`) from the run folder."""
    name = f"ours-{job.name}"
    overrides = job_overrides(job, model, work_dir / "cache")
    run = train(work_dir / name, work_dir / f"{name}.log", QUICKSTART, overrides)
    windows, final = run.windows, run.read("eval_results.json")
    last_eval = [r for r in run.records if any(k.startswith("eval_") for k in r)][-1]
    if final["best_step"] != last_eval["step"] or last_eval["step"] != final["steps"]:
        raise RuntimeError(f"{name}: expected one evaluation, after training")
    summary = run.read("run_summary.json")
    marks = [(0, 0.0)] + [(w["step"], w["elapsed_s"]) for w in windows]
    return side(
        run.measured,
        steps=final["steps"],
        samples=final["steps"] * job.batch_size,  # each epoch's partial last batch is dropped
        tokens=sum(w["tokens"] for w in windows),
        train_s=windows[-1]["elapsed_s"],
        step_times=[(t - s) / (b - a) for (a, s), (b, t) in itertools.pairwise(marks)],
        metrics={k.removeprefix("eval_"): v for k, v in last_eval.items() if k != "step"},
        final_dir=str(run.run_dir / "final"),
        parameters=summary["parameters"],
        trainable_parameters=summary["trainable_parameters"],
        final_train_loss=windows[-1]["loss"],
        gpu_peak_mb=windows[-1].get("gpu_peak_mb"),
    )
