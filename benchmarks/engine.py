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
    return [*(["env", *env] if env else []), sys.executable, *launcher, "-m", "trainer", *args]


def overrides(settings: dict, prefix: str = "") -> list[str]:
    """Nested settings as the CLI's key=value overrides. Values are written as JSON, which
    YAML reads back unchanged: `no` stays a string, a list stays a list."""
    found = []
    for key, value in settings.items():
        if isinstance(value, dict):
            found += overrides(value, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}={json.dumps(value)}")
    return found


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
    run_dir: Path, settings: dict, config: Path | None = None, **start: Sequence[str]
) -> EngineRun:
    """`trainer train` in a fresh process, measured, its output in RUN_DIR.log: `config`
    with `settings` as overrides, or without a config the settings written as RUN_DIR.yaml.
    How it starts: `trainer_command`'s keywords. A run folder left by an earlier run (a kept
    --work-dir) is removed first."""
    shutil.rmtree(run_dir, ignore_errors=True)
    settings = {**settings, "output_dir": str(run_dir)}
    pinned = overrides(settings)
    if config is None:
        config, pinned = run_dir.with_suffix(".yaml"), []
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
    command = trainer_command("train", str(config), *pinned, **start)
    measured = run_measured(command, run_dir.with_suffix(".log"))
    return EngineRun(measured, run_dir, read_jsonl(run_dir / "metrics.jsonl"))


def job_settings(job: Job, model: str, cache: Path) -> dict[str, Any]:
    """Every setting the comparison depends on, pinned (eval: only after training)."""
    data = {"train": job.train, "validation": job.validation, "max_length": job.max_length}
    train_ = {"epochs": job.epochs, "max_steps": job.max_steps, "lr": job.lr, "seed": job.seed}
    train_ |= {"global_batch_size": job.batch_size, "micro_batch_size": job.batch_size}
    train_ |= {"warmup_ratio": job.warmup_ratio, "weight_decay": job.weight_decay}
    train_ |= {"max_grad_norm": job.max_grad_norm, "scheduler": "linear", "precision": "no"}
    peft = {"method": job.peft}
    if job.peft != "none":
        peft |= {"r": LORA.r, "alpha": LORA.alpha, "dropout": LORA.dropout}
        peft["target_modules"] = list(LORA.target_modules)
    return {
        "task": job.task,
        "model": {"name_or_path": model},
        "data": {**data, "cache_dir": str(cache), "group_by_length": job.ours_grouped},
        "train": train_,
        "eval": {"batch_size": job.eval_batch_size, "every_steps": 10**9, "metric": job.metrics[0]},
        "log": {"every_steps": job.log_every, "trackers": []},
        "peft": peft,
    }


def run_job(job: Job, model: str, work_dir: Path) -> dict[str, Any]:
    """Our side of a comparison: the quickstart config with `job_settings`; one side's
    numbers (see `comparison.side`) from the run folder."""
    run = train(
        work_dir / f"ours-{job.name}", job_settings(job, model, work_dir / "cache"), QUICKSTART
    )
    windows, final = run.windows, run.read("eval_results.json")
    last_eval = [r for r in run.records if any(k.startswith("eval_") for k in r)][-1]
    if final["best_step"] != last_eval["step"] or last_eval["step"] != final["steps"]:
        raise RuntimeError(f"{run.run_dir.name}: expected one evaluation, after training")
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
        gpu_peak_mb=windows[-1].get("gpu_peak_mb"),
    )
