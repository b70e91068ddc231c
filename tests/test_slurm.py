"""launch.slurm and `trainer submit`: the rendered sbatch script, its submission, and a
simulated two-node job on this machine (fake `srun` / `scontrol` / `sbatch` first on PATH):
trained to the end, or stopped by SIGUSR1, requeued once and resumed. The slurm/ templates
requeue the same way."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_run_config, read_metrics, reset_accelerate
from interrupted_runs import run_and_signal, saved_steps
from test_launch import PARITY, assert_same_training, losses

from trainer.cli import main
from trainer.run.resume import checkpoint_dir, problem_with
from trainer.run.stop import EXIT_PREEMPTED

# Starts the per-node command once per "node", in parallel, as srun does with one task per
# node; SIGUSR1 goes to every process of the tasks, like slurmstepd's signal to a step.
FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
while args[0].startswith("--"):
    args.pop(0)
log = Path(os.environ["FAKE_SLURM_LOG"])
with (log / "srun").open("a") as handle:
    handle.write(repr(args) + "\\n")
if "FAKE_SRUN_EXIT" in os.environ:  # the step's exit code, without starting the step
    sys.exit(int(os.environ["FAKE_SRUN_EXIT"]))
nodes = int(os.environ.get("FAKE_SRUN_NODES", "2"))
tasks = []
for node in range(nodes):
    env = {{**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node),
           "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": "localhost"}}
    tasks.append(subprocess.Popen(args, env=env))

def descendants(pid):
    children = Path(f"/proc/{{pid}}/task/{{pid}}/children")
    found = [int(p) for p in children.read_text().split()] if children.exists() else []
    return found + [d for child in found for d in descendants(child)]

def forward(number, _frame):
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass

signal.signal(signal.SIGUSR1, forward)
codes = [task.wait() for task in tasks]
sys.exit(next((code for code in codes if code), 0))
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") echo localhost ;;
    requeue*) echo "$2" >> "$FAKE_SLURM_LOG/requeue" ;;
    *) exit 1 ;;
esac
"""
FAKE_SBATCH = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_SLURM_LOG/sbatch"
echo "Submitted batch job 4242"
"""


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """A bin/ folder with fake sbatch, srun and scontrol, first on PATH; returns the folder
    they record into."""
    bin_dir, log = tmp_path / "fake-bin", tmp_path / "slurm-log"
    bin_dir.mkdir()
    log.mkdir()
    scripts = {
        "srun": FAKE_SRUN.format(python=sys.executable),
        "scontrol": FAKE_SCONTROL,
        "sbatch": FAKE_SBATCH,
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    return log


@pytest.fixture
def zero3_config(run_config) -> Path:
    return run_config("mlm", train={"global_batch_size": 32, "micro_batch_size": 2})


# --- the rendered script ----------------------------------------------------------------------


def test_dry_run_prints_the_script_and_submits_nothing(zero3_config, fake_slurm, capsys):
    assert cli("submit", zero3_config, "--cluster", "2node-16gpu-zero3", "--dry-run") == 0
    script = capsys.readouterr().out
    run_dir = zero3_config.parent / "run"
    assert script == (run_dir / "launch" / "job.sbatch").read_text()
    assert not (fake_slurm / "sbatch").exists()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --time=48:00:00",
        "#SBATCH --exclusive",
        f"#SBATCH --output={run_dir}/logs/%j.out",
        f"#SBATCH --error={run_dir}/logs/%j.out",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "export TRAINER_SLURM_REQUEUE=1",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "export TORCH_NCCL_DUMP_ON_TIMEOUT=1",
        'MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
    ):
        assert line in script.splitlines(), line
    assert "--partition" not in script, "unset options stay out"
    assert '--machine_rank "$SLURM_NODEID"' in script
    assert "--deepspeed_multinode_launcher standard" in script
    assert (run_dir / "launch" / "deepspeed.json").is_file()
    assert (run_dir / "launch" / "accelerate_config.yaml").is_file()
    assert subprocess.run(["bash", "-n", run_dir / "launch" / "job.sbatch"]).returncode == 0


def test_sbatch_lines_from_the_profile(zero3_config, tmp_path, capsys):
    profile = tmp_path / "cluster.yaml"
    profile.write_text(
        "device: gpu\nnodes: 1\nprocesses_per_node: 8\nprecision: bf16\n"
        "slurm: {partition: gpu, account: proj1, qos: high, constraint: a100, gres: 'gpu:8',"
        " extra: ['--mem=0'], signal_grace_s: 120}\n"
    )
    assert cli("submit", zero3_config, "--cluster", profile, "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    for option in ("--partition=gpu", "--account=proj1", "--qos=high", "--constraint=a100"):
        assert f"#SBATCH {option}" in lines
    assert "#SBATCH --mem=0" in lines
    assert "#SBATCH --signal=B:USR1@120" in lines


def test_submit_passes_the_script_to_sbatch(zero3_config, fake_slurm, capfd):
    assert cli("submit", zero3_config, "--cluster", "2node-16gpu-zero3", "data.max_length=16") == 0
    script = zero3_config.parent / "run" / "launch" / "job.sbatch"
    assert (fake_slurm / "sbatch").read_text().splitlines() == [str(script)]
    assert "Submitted batch job 4242" in capfd.readouterr().out
    assert "data.max_length=16" in script.read_text()


def test_submit_without_sbatch_is_one_line_error(zero3_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    assert cli("submit", zero3_config, "--cluster", "2node-16gpu-zero3") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sbatch: not found") and err.count("\n") == 1


def test_paths_with_spaces_and_quotes_survive_the_node_shell(
    tmp_path, tiny_models_by_task, data_dir, capsys
):
    folder = tmp_path / "it's a run"
    folder.mkdir()
    config = make_run_config(folder, "mlm", tiny_models_by_task, data_dir, **PARITY)
    assert cli("submit", config, "--cluster", "2node-cpu-sim", "--dry-run") == 0
    per_node = next(line for line in capsys.readouterr().out.splitlines() if "bash -c" in line)
    node_shell = shlex.split(per_node)[-2]  # what `bash -c` gets on each node
    words = shlex.split(node_shell)
    assert str(config.resolve()) in words
    assert "$SLURM_NODEID" in words
    assert '--node_rank "$SLURM_NODEID"' in node_shell


# --- values that could break out of their line, secrets ------------------------------------


def submit_error(capsys, *argv) -> str:
    assert cli("submit", *argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_newline_in_output_dir_or_an_override_is_refused_before_anything_is_written(
    run_config, tmp_path, fake_slurm, capsys
):
    # unchecked, the newline ended the comment and #SBATCH lines that hold the run
    # directory: the rest ran as a bash command, and --signal and --requeue were dropped
    config = run_config("mlm", output_dir=str(tmp_path / "run\ntouch pwned"))
    line = submit_error(capsys, config, "--cluster", "cpu-debug", "--dry-run")
    assert line.startswith("error: output_dir: ") and "control character" in line
    assert not any(tmp_path.glob("run*")), "nothing written"
    line = submit_error(
        capsys, run_config("mlm"), "--cluster", "cpu-debug", "data.text_column=t\necho x"
    )
    assert line.startswith("error: override 1: 'data.text_column=t\\necho x' holds a control")
    assert not (tmp_path / "run").exists() and not (fake_slurm / "sbatch").exists()


def test_a_newline_in_a_profile_value_is_refused(zero3_config, tmp_path, capsys):
    profile = tmp_path / "cluster.yaml"
    profile.write_text(yaml.safe_dump({"slurm": {"partition": "gpu\necho pwned"}}))
    line = submit_error(capsys, zero3_config, "--cluster", profile, "--dry-run")
    assert "slurm.partition: 'gpu\\necho pwned' holds a control character" in line


SECRETS_PROFILE = {"env": {"HF_TOKEN": "hf_s3cret", "WANDB_API_KEY": "wb_s3cret", "X_A": "1"}}
RECORD_ENV_SBATCH = """#!/bin/bash
env > "$FAKE_SLURM_LOG/sbatch-env"
echo "Submitted batch job 4243"
"""


def test_profile_secrets_reach_the_job_through_sbatch_never_the_script(
    run_config, tmp_path, fake_slurm, capsys
):
    profile = tmp_path / "cluster.yaml"
    profile.write_text(yaml.safe_dump(SECRETS_PROFILE))
    sbatch = Path(os.environ["PATH"].split(os.pathsep)[0]) / "sbatch"
    sbatch.write_text(RECORD_ENV_SBATCH)
    config = run_config("mlm")
    assert cli("submit", config, "--cluster", profile, "--dry-run") == 0
    printed = capsys.readouterr().out
    script = (tmp_path / "run" / "launch" / "job.sbatch").read_text()
    for text in (printed, script):
        assert "s3cret" not in text
        assert "export X_A=1" in text.splitlines()
    assert cli("submit", config, "--cluster", profile) == 0
    passed = (fake_slurm / "sbatch-env").read_text().splitlines()
    assert "HF_TOKEN=hf_s3cret" in passed and "WANDB_API_KEY=wb_s3cret" in passed
    # the job checks that they arrived (sbatch --export=NONE would drop them)
    check = next(line for line in script.splitlines() if "HF_TOKEN" in line)
    bare = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    missing = subprocess.run(["bash", "-c", check], env=bare, capture_output=True, text=True)
    assert missing.returncode == 2 and "error: env.HF_TOKEN: " in missing.stderr
    arrived = {**bare, "HF_TOKEN": "hf_s3cret"}
    assert subprocess.run(["bash", "-c", check], env=arrived).returncode == 0


# --- a two-node job, simulated on this machine ------------------------------------------------


def batch_env(job_id: str, **extra: str) -> dict[str, str]:
    """What the batch shell of job `job_id` sees (the script itself sets the requeue flag)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("TRAINER_SLURM_REQUEUE", None)
    return {**env, "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "localhost", **extra}


def run_batch_script(script: Path, job_id: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script)],
        cwd=REPO,
        env=batch_env(job_id, **extra),
        capture_output=True,
        text=True,
        timeout=500,
    )


@pytest.mark.slow
def test_simulated_two_node_job_trains_like_one_process(
    tmp_path, tiny_models_by_task, data_dir, fake_slurm, capsys
):
    configs = {}
    for name in ("sim", "ref"):
        (tmp_path / name).mkdir()
        configs[name] = make_run_config(
            tmp_path / name, "mlm", tiny_models_by_task, data_dir, **PARITY
        )
    assert cli("submit", configs["sim"], "--cluster", "2node-cpu-sim", "--dry-run") == 0
    run_dir = tmp_path / "sim" / "run"
    done = run_batch_script(run_dir / "launch" / "job.sbatch", "4242")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "rendezvous at localhost:24242" in done.stdout  # 20000 + job id % 20000
    # the batch shell tokenized the data (or found it tokenized) before srun: every rank
    # then loaded it from the cache (run_summary's data_cache below)
    assert "tokenized data " in done.stdout

    # Each node got the same, unexpanded command; the nodes expanded their own rank.
    started = (fake_slurm / "srun").read_text().splitlines()
    assert len(started) == 1 and "$SLURM_NODEID" in started[0]
    assert (run_dir / "final" / "model.safetensors").is_file()
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, PARITY["train"]["max_steps"] + 1))
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["processes"] == 2 and summary["data_cache"]["status"] == "hit"
    assert not (fake_slurm / "requeue").exists(), "a finished job is not requeued"

    assert cli("train", configs["ref"]) == 0
    assert_same_training(run_dir, tmp_path / "ref" / "run")


@pytest.mark.slow
def test_sigusr1_to_the_simulated_job_requeues_it_once_and_the_requeued_job_resumes(
    tmp_path, tiny_models_by_task, data_dir, fake_slurm, capsys
):
    sections = {**PARITY, "train": {**PARITY["train"], "max_steps": 40}}
    configs = {}
    for name in ("sim", "ref"):
        (tmp_path / name).mkdir()
        configs[name] = make_run_config(
            tmp_path / name, "mlm", tiny_models_by_task, data_dir, **sections
        )
    assert cli("submit", configs["sim"], "--cluster", "2node-cpu-sim", "--dry-run") == 0
    run_dir = tmp_path / "sim" / "run"
    script = run_dir / "launch" / "job.sbatch"
    # SLURM's --signal=B:USR1 warns the batch shell only; its trap passes it on to srun.
    stopped = run_and_signal(
        ["bash", str(script)], run_dir, 2, number=signal.SIGUSR1, env=batch_env("4242")
    )
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stdout[-2000:] + stopped.stderr[-4000:]
    assert "job 4242: training exited with 75" in stopped.stdout
    assert (fake_slurm / "requeue").read_text().splitlines() == ["4242"]
    assert "requeued SLURM job 4242: it resumes from the saved checkpoint" in stopped.stderr
    step = saved_steps(run_dir)[-1]
    assert 2 <= step < 40 and not (run_dir / "final").exists()
    assert problem_with(checkpoint_dir(run_dir, step)) is None

    # SLURM starts the requeued job with the same script; it resumes and is not requeued again.
    resumed = run_batch_script(script, "4242", SLURM_RESTART_COUNT="1")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "job 4242 (restart 1)" in resumed.stdout
    assert f"(step {step})" in resumed.stderr
    assert (fake_slurm / "requeue").read_text().splitlines() == ["4242"], "requeued once"
    # Every step logged once; the same loss curve as one uninterrupted process (the weights
    # drift apart within float rounding over 40 steps of 2 processes, see test_launch).
    assert cli("train", configs["ref"]) == 0
    got, expected = losses(run_dir), losses(tmp_path / "ref" / "run")
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 41))
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)
    assert (run_dir / "final" / "model.safetensors").is_file()


def template(name: str, config: Path) -> str:
    """slurm/NAME.sbatch with its placeholders filled in for `config`."""
    text = (REPO / "slurm" / f"{name}.sbatch").read_text()
    values = {
        "PYTHON": sys.executable,
        "CONFIG": str(config),
        "RUN_DIR": str(config.parent / "run"),
    }
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "status"),
    [
        ("rendered", 75),
        ("rendered", 1),
        ("rendered", 2),  # a user error, and 3 (training failed): the job exits with them
        ("rendered", 3),
        ("single-node", 75),
        ("multi-node", 75),
    ],
)
def test_the_batch_scripts_requeue_only_after_75(
    tmp_path, tiny_models_by_task, data_dir, fake_slurm, capsys, script, status
):
    """The training step (a fake srun) ends with `status`: the script exits with it, and
    runs `python -m launch.requeue` (one `scontrol requeue 4242`) only for 75."""
    config = make_run_config(tmp_path, "mlm", tiny_models_by_task, data_dir, **PARITY)
    assert cli("submit", config, "--cluster", "2node-cpu-sim", "--dry-run") == 0
    path = config.parent / "run" / "launch" / "job.sbatch"
    if script != "rendered":
        path = tmp_path / f"{script}.sbatch"
        path.write_text(template(script, config))
    done = run_batch_script(path, "4242", FAKE_SRUN_EXIT=str(status))
    assert done.returncode == status, done.stdout[-2000:] + done.stderr[-4000:]
    assert len((fake_slurm / "srun").read_text().splitlines()) == 1
    requeued = fake_slurm / "requeue"
    if status == EXIT_PREEMPTED:
        assert requeued.read_text().splitlines() == ["4242"]
        assert "requeued SLURM job 4242" in done.stderr
    else:
        assert not requeued.exists()
