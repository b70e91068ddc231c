"""`trainer submit`: render an sbatch script for a job and submit it.

The script runs one SLURM task per node; each task starts that node's launcher (through
`python -m launch.node`, which exits with the training processes' code) with its machine
rank from `$SLURM_NODEID`, expanded on the node (the script keeps it literal). The batch
shell is warned with SIGUSR1 `signal_grace_s` before the time limit and forwards it to the
training processes, which save a checkpoint and exit with 75; the batch shell then runs
`python -m launch.requeue` (TRAINER_SLURM_REQUEUE=1 is exported), which requeues the job
once, and the requeued job resumes from that checkpoint (train.resume=auto).
slurm/*.sbatch are the same script as editable templates.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launch.job import Job, checked_job, write_launch_files
from launch.local import node_command
from launch.profiles import ClusterProfile, control_character, unsafe_value
from launch.requeue import REQUEUE_ENV
from trainer.errors import UserError
from trainer.logs import get_logger
from trainer.run.stop import EXIT_PREEMPTED
from trainer.security import is_secret

# Shell variables the per-node command leaves for the node to expand.
NODE_RANK, MAIN_ADDR, MAIN_PORT = "$SLURM_NODEID", "$MAIN_ADDR", "$MAIN_PORT"
NODE_VARIABLES = (NODE_RANK, MAIN_ADDR, MAIN_PORT)

logger = get_logger(__name__)

BODY = """\
set -o pipefail
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST"

# launch.requeue (at the end) requeues the job when training stops at a saved checkpoint.
export {requeue_env}=1
{exports}
# The first node hosts the rendezvous; the port is fixed per job so that every node agrees.
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MAIN_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MAIN_ADDR MAIN_PORT
echo "rendezvous at $MAIN_ADDR:$MAIN_PORT"

# Tokenize the data once, here, before any rank starts; the ranks then load it from
# data.cache_dir (on a filesystem every node sees) in seconds. Cheap when already built.
{prepare} || exit $?

# --signal=B:USR1 warns only this batch shell, and bash runs a trap only once the foreground
# command ends: so srun runs in the background and the trap passes USR1 on to it (srun
# forwards it to every process of its tasks). Killing srun directly needs no round trip to
# the controller, unlike `scancel --signal=USR1`. Each node's launcher ignores USR1 (it must
# outlive its training processes' checkpoint); the training processes catch it themselves.
forward_usr1() {{
    echo "SIGUSR1: the training processes save a checkpoint and stop"
    kill -USR1 "$SRUN_PID"
    wait "$SRUN_PID"
    STATUS=$?
}}
trap forward_usr1 USR1

# One task per node; single quotes keep $SLURM_NODEID for the node's own shell.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\
    bash -c {node_command} &
SRUN_PID=$!
wait "$SRUN_PID"
STATUS=${{STATUS:-$?}}
echo "job $SLURM_JOB_ID: training exited with $STATUS"

# {preempted}: every process saved a checkpoint and stopped early (SIGUSR1, train.max_time).
# launch.requeue validates the job id and runs `scontrol requeue` once; the requeued job
# runs this script again and resumes from the checkpoint. Any other status ends the job.
if [ "$STATUS" -eq {preempted} ]; then
    {requeue}
fi
exit "$STATUS"
"""


def sbatch_options(job: Job, workdir: Path) -> list[str]:
    """The #SBATCH options: resources from the profile's slurm block, logs in RUN_DIR/logs."""
    slurm = job.profile.slurm
    log = job.run_dir / "logs" / "%j.out"
    options = [
        f"--job-name={'-'.join(job.run_dir.name.split())}",
        f"--nodes={job.profile.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={slurm.cpus_per_task}",
    ]
    optional = {
        "gres": slurm.gres,
        "partition": slurm.partition,
        "account": slurm.account,
        "qos": slurm.qos,
        "constraint": slurm.constraint,
        "time": slurm.time,
    }
    options += [f"--{name}={value}" for name, value in optional.items() if value]
    options += [str(line) for line in slurm.extra]
    return [
        *options,
        f"--chdir={workdir}",
        f"--output={log}",
        f"--error={log}",
        f"--signal=B:USR1@{slurm.signal_grace_s}",
        "--requeue",
        "--open-mode=append",
    ]


def directive(option: str) -> str:
    """An #SBATCH option; a value with spaces in double quotes (sbatch reads those)."""
    name, _, value = option.partition("=")
    return f'{name}="{value}"' if value and any(c.isspace() for c in value) else option


def shell_word(argument: str) -> str:
    """One argument for the node's shell: quoted, except the variables it must expand."""
    return f'"{argument}"' if argument in NODE_VARIABLES else shlex.quote(argument)


def exports(profile: ClusterProfile) -> str:
    """`export KEY=VALUE` lines for the profile's env block. A secret (HF_TOKEN,
    WANDB_API_KEY: see trainer.security.is_secret) is never written into the script, which
    lies in the run directory and is printed by --dry-run: `submit` hands it to sbatch in
    its environment, which sbatch passes to the job, and the script checks that it came."""
    lines = []
    for key, value in profile.env.items():
        if is_secret(key):
            lines.append(
                f'[ -n "${{{key}+set}}" ] || {{ echo "error: env.{key}: the secret did not '
                "reach the job (sbatch passes it from the submitting environment; check "
                '--export)" >&2; exit 2; }'
            )
        else:
            lines.append(f"export {key}={shlex.quote(str(value))}")
    return "\n".join(lines)


def secret_environment(profile: ClusterProfile) -> dict[str, str]:
    """The profile's secrets, for sbatch's environment instead of the script."""
    return {key: str(value) for key, value in profile.env.items() if is_secret(key)}


def check_script_values(job: Job, workdir: Path) -> None:
    """Refuse any value the script would hold (the profile's are checked when it loads)
    that has a control character: a newline in output_dir or an override would end its
    line and run the rest as a bash command (see launch.profiles.control_character)."""
    values = {
        "output_dir": job.run_dir,
        "CONFIG": job.config_path.resolve(),
        "the working directory": workdir,
        "python": sys.executable,
        **{f"override {index + 1}": item for index, item in enumerate(job.overrides)},
    }
    errors = [unsafe_value(key, value) for key, value in values.items() if control_character(value)]
    if errors:
        raise UserError("; ".join(errors))


def render_script(job: Job, config_file: Path) -> str:
    """The sbatch script for this job (see the module docstring)."""
    launcher = node_command(job, config_file, NODE_RANK, MAIN_ADDR, MAIN_PORT)
    command = [sys.executable, "-m", "launch.node", *launcher]
    per_node = 'trap "" USR1; exec ' + " ".join(shell_word(arg) for arg in command)
    submitted = shlex.join([str(job.config_path), "--cluster", job.profile.name, *job.overrides])
    header = [
        "#!/bin/bash",
        f"# Rendered by: trainer submit {submitted}",
        f"# Run directory: {job.run_dir}",
        *(f"#SBATCH {directive(option)}" for option in sbatch_options(job, Path.cwd())),
        "",
        "",
    ]
    body = BODY.format(
        prepare=shlex.join([sys.executable, "-m", "trainer", *job.prepare_arguments()]),
        requeue_env=REQUEUE_ENV,
        preempted=EXIT_PREEMPTED,
        requeue=shlex.join([sys.executable, "-m", "launch.requeue"]),
        exports=exports(job.profile),
        node_command=shlex.quote(per_node),
    )
    return "\n".join(header) + body


def submit(
    config: str,
    cluster: str,
    overrides: list[str],
    dry_run: bool = False,
    user_files: tuple[str | None, ...] = (),
) -> int:
    """`trainer submit`: write RUN_DIR/launch/ (script, Accelerate config, DeepSpeed JSON)
    and pass the script to sbatch, or print it with --dry-run. `user_files`: the user's
    Accelerate config and DeepSpeed JSON (or None)."""
    job = checked_job(config, cluster, overrides, *user_files)
    check_script_values(job, Path.cwd())
    if not dry_run and shutil.which("sbatch") is None:
        raise UserError(
            "sbatch: not found on PATH; submit from a SLURM login node, or use --dry-run"
        )
    config_file, _ = write_launch_files(job)
    (job.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    script = config_file.parent / "job.sbatch"
    tmp = script.with_name(f".{script.name}.tmp")
    tmp.write_text(render_script(job, config_file))
    tmp.replace(script)
    if dry_run:
        print(script.read_text(), end="")
        logger.info("# written to %s; not submitted (--dry-run)", script)
        return 0
    environment = {**os.environ, **secret_environment(job.profile)}
    result = subprocess.run(["sbatch", str(script)], check=False, env=environment)
    return result.returncode
