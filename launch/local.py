"""`trainer launch`: start one job on this machine, with the processes its profile asks for.

The run config and the profile are checked together first (`resolve_job`), the Accelerate
config and DeepSpeed JSON are written into RUN_DIR/launch/, then one launcher process starts
the training processes. Its exit code is ours, except that the codes the training processes
mean something by (2: a user error, 3: training failed, 75: preempted, every process saved)
come through unchanged, though the launcher itself reports 1 for them.
Inside a requeue-enabled SLURM job (TRAINER_SLURM_REQUEUE=1) a 75 then requeues the job
(launch/requeue.py), as the batch script of `trainer submit` does.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from launch.job import Job, accelerate_command, checked_job, write_launch_files
from launch.requeue import requeue_preempted_job, slurm_job_to_requeue
from trainer.errors import EXIT_TRAINING_FAILED, EXIT_USER_ERROR, UserError
from trainer.logs import get_logger
from trainer.progress import child_environment
from trainer.run.stop import EXIT_INTERRUPTED, EXIT_PREEMPTED

# How the launchers report their children's exit codes on stderr: torch.distributed.run
# (also under `accelerate launch`) lists "exitcode  : 75 (pid: ...)" per failed rank;
# accelerate's one-process launcher raises "... returned non-zero exit status 75."
_EXIT_CODE_REPORTS = (
    re.compile(rb"exitcode\s*:\s*(-?\d+)"),
    re.compile(rb"returned non-zero exit status (-?\d+)"),
)
_STDERR_TAIL = 1 << 16  # the failure report is at the end of the launcher's stderr
PASSED_THROUGH = (EXIT_USER_ERROR, EXIT_TRAINING_FAILED, EXIT_PREEMPTED)
# torchrun stops the other processes with SIGTERM once one has exited: they report -15. Any
# other signal (SIGKILL from the OOM killer: -9) is a failure of its own.
_STOPPED_BY_LAUNCHER = -signal.SIGTERM
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)  # ALRM: resend; and SIGUSR1

logger = get_logger(__name__)


def node_command(job: Job, config_file: Path, node_rank: str, address: str, port: str) -> list[str]:
    """The command that starts this job's processes on one node (node_rank, address and port
    may be shell variables that the node expands).

    CPU profiles use torch.distributed.run, not `accelerate launch`: Accelerate's MULTI_CPU
    path starts ONE process (without RANK / WORLD_SIZE) unless it is given an MPI hostfile
    and mpirun, and the CPU parity tests and SLURM simulation must not need MPI. torchrun
    starts the processes itself and the training code's `Accelerator(cpu=True)` picks up
    gloo DDP from its environment (the same launcher accelerate uses for GPUs). DeepSpeed
    profiles on CPU go through `accelerate launch` as on GPUs: under plain torchrun the
    training code would see no DeepSpeed config and silently train as DDP.
    """
    if job.profile.device == "cpu" and job.profile.backend == "ddp":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(job.profile.processes_per_node),
            "--nnodes",
            str(job.profile.nodes),
            "--node_rank",
            node_rank,
            "--master_addr",
            address,
            "--master_port",
            port,
            "-m",
            "trainer",
            *job.train_arguments(),
        ]
    command = accelerate_command(job, config_file, node_rank, address, port)
    if job.profile.backend == "deepspeed" and job.profile.nodes > 1:
        # One launcher per node (SLURM starts them): without this Accelerate would start
        # every node itself over pdsh.
        script = command.index("-m", 3)
        command[script:script] = ["--deepspeed_multinode_launcher", "standard"]
    return command


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def profile_environment(job: Job) -> dict[str, str]:
    """This process's environment plus the profile's `env` block; DeepSpeed on a CPU
    profile runs on DeepSpeed's CPU accelerator (gloo), not on a GPU it would look for."""
    env = {**os.environ, **{key: str(value) for key, value in job.profile.env.items()}}
    if job.profile.device == "cpu" and job.profile.backend == "deepspeed":
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def children_exit_code(launcher_code: int, stderr_tail: bytes) -> int:
    """The training processes' own code when they all exited with the same one of 2, 3
    and 75 (those stopped by the launcher after the first one left aside), which the
    launcher reports as 1; otherwise the launcher's own code."""
    if launcher_code == 0:
        return 0
    reported = {int(m) for pattern in _EXIT_CODE_REPORTS for m in pattern.findall(stderr_tail)}
    own = reported - {_STOPPED_BY_LAUNCHER}
    if len(own) == 1 and (code := own.pop()) in PASSED_THROUGH:
        return code
    return launcher_code


def check_devices(job: Job) -> None:
    """A GPU profile starts one process per GPU: refuse it on a machine with fewer."""
    if job.profile.device != "gpu":
        return
    import torch

    found = torch.cuda.device_count()
    if found < job.profile.processes_per_node:
        raise UserError(
            f"--cluster: {job.profile.name} starts {job.profile.processes_per_node} processes, "
            f"one per GPU, but this machine has {found} GPU(s) (torch.cuda.device_count()); "
            "use a profile with fewer processes_per_node"
        )


class SignalForwarder:
    """While the launcher runs: SIGTERM, SIGUSR1 and SIGINT to this process are passed on
    to the launcher's process group (its own, so that a terminal's Ctrl-C reaches only us)
    as SIGUSR1, and again every `RESEND_S` seconds until it exits: training processes that
    were not up yet (or not yet handling signals) get it too.

    SIGUSR1, not the signal itself: the launcher ignores SIGUSR1 (inherited from us) but
    handles SIGTERM and SIGINT by stopping its processes after a short grace (torchrun: 30 s,
    then SIGKILL), which would kill them in the middle of their checkpoint; the training
    processes treat all three alike (trainer/run/stop.py). A second SIGINT (Ctrl-C twice)
    kills the launcher's group at once."""

    RESEND_S = 5.0

    def __init__(self) -> None:
        self.group: int | None = None  # known once the launcher runs
        self.asked: str | None = None
        self.interrupts = 0
        self._previous = {n: signal.signal(n, self._on_signal) for n in FORWARDED}
        # SIGUSR1 ignored until the launcher runs, for it to inherit the ignore (a handler
        # of ours would be SIG_DFL in it): forward_to takes SIGUSR1 over after that.
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def forward_to(self, group: int) -> None:
        """The launcher is up: send to its group, SIGUSR1 included from now on."""
        self.group = group
        signal.signal(signal.SIGUSR1, self._on_signal)
        if self.asked is not None:
            self._send(signal.SIGUSR1)

    def _on_signal(self, number: int, _frame) -> None:
        if number == signal.SIGALRM:  # the resend timer
            self._send(signal.SIGUSR1)
            return
        self.interrupts += number == signal.SIGINT
        if self.interrupts > 1:
            _say("launch: second SIGINT: killing the training processes")
            self._send(signal.SIGKILL)
            return
        if self.asked is None:
            self.asked = signal.Signals(number).name
            _say(
                f"launch: {self.asked}: the training processes save a checkpoint and stop "
                "(passed on as SIGUSR1)"
            )
            signal.setitimer(signal.ITIMER_REAL, self.RESEND_S, self.RESEND_S)
        self._send(signal.SIGUSR1)

    def _send(self, number: int) -> None:
        if self.group is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.killpg(self.group, number)

    def close(self) -> None:
        """Stop resending and put the previous handlers back."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for number, previous in self._previous.items():
            signal.signal(number, previous)


def _say(line: str) -> None:
    """A line on stderr from a signal handler: os.write, since the handler may interrupt a
    write to sys.stderr's buffer, which raises on a reentrant call."""
    os.write(sys.stderr.fileno(), (line + "\n").encode())


def run_streaming(command: list[str], env: dict[str, str]) -> int:
    """Run `command`, passing its stderr through unchanged (progress bars included) while
    keeping the tail to read the children's exit codes from; returns the exit code.

    The launcher starts in a process group of its own with SIGUSR1 ignored: a cluster that
    signals every process of the job must not kill it, since it has to outlive the
    training processes' checkpoint to report its 75; the training processes catch it.
    The signals this process gets are forwarded (SignalForwarder)."""
    forwarder = SignalForwarder()
    try:
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, start_new_session=True)
    except OSError:
        forwarder.close()
        raise
    forwarder.forward_to(process.pid)
    assert process.stderr is not None
    tail = b""
    try:
        while chunk := os.read(process.stderr.fileno(), 8192):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail = (tail + chunk)[-_STDERR_TAIL:]
    finally:
        code = process.wait()
        forwarder.close()
    if forwarder.interrupts > 1:
        return EXIT_INTERRUPTED
    return children_exit_code(code, tail)


def launch(
    config: str, cluster: str, overrides: list[str], user_files: tuple[str | None, ...] = ()
) -> int:
    """`trainer launch`: the job's processes on this machine; returns their exit code, after
    requeueing the SLURM job it runs in when they were preempted (see the module docstring).
    `user_files`: the user's Accelerate config and DeepSpeed JSON (or None)."""
    job = checked_job(config, cluster, overrides, *user_files)
    if job.profile.nodes > 1:
        raise UserError(
            f"--cluster: {job.profile.name} spans {job.profile.nodes} nodes and `trainer launch` "
            "starts only this machine; use `trainer submit` (SLURM)"
        )
    check_devices(job)
    config_file, _ = write_launch_files(job)
    command = node_command(job, config_file, "0", "127.0.0.1", str(free_port()))
    logger.info("launch: %d process(es) on this machine", job.profile.world_size)
    code = run_streaming(command, profile_environment(job) | child_environment())
    job_id = slurm_job_to_requeue()
    if code == EXIT_PREEMPTED and job_id is not None:
        requeue_preempted_job(job_id)
    return code
