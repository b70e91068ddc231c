"""`trainer plan | launch | submit`: the sub-commands that start a job on a cluster profile.

Registered into the `trainer` command by trainer/cli.py; the work is in launch/plan.py,
launch/local.py and launch/slurm.py, imported only when the sub-command runs.
"""

from __future__ import annotations

import argparse

from trainer.cli_help import examples

PARITY = "configs/mlm-domain-adaptive-pretraining.yaml"


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML")
    parser.add_argument(
        "--cluster", required=True, help="profile: a shipped name (launch/clusters/) or a YAML file"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")


def _user_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="your Accelerate config: kept, checked against the run config, 'auto' filled in",
    )
    parser.add_argument(
        "--deepspeed",
        metavar="FILE",
        help="your DeepSpeed JSON (deepspeed profiles): checked, 'auto' filled in",
    )


def _plan(args: argparse.Namespace) -> int:
    from launch.plan import plan

    print(plan(args.config, args.cluster, args.overrides))
    return 0


def _launch(args: argparse.Namespace) -> int:
    from launch.local import launch

    user_files = (args.accelerate_config, args.deepspeed)
    return launch(args.config, args.cluster, args.overrides, user_files)


def _submit(args: argparse.Namespace) -> int:
    from launch.slurm import submit

    user_files = (args.accelerate_config, args.deepspeed)
    return submit(args.config, args.cluster, args.overrides, args.dry_run, user_files)


def add_commands(commands) -> None:
    """Add plan, launch and submit to the `trainer` sub-command parser."""
    plan = commands.add_parser(
        "plan",
        help="batch, steps, backend settings, memory per device",
        epilog=examples(
            f"trainer plan {PARITY} --cluster 8gpu-zero3-offload",
            f"trainer plan {PARITY} --cluster my-cluster.yaml train.global_batch_size=256",
        ),
    )
    _job_arguments(plan)
    plan.set_defaults(run=_plan)
    launch = commands.add_parser(
        "launch",
        help="start the processes on this machine (torchrun on CPU, accelerate on GPU)",
        epilog=examples(
            f"trainer launch {PARITY} --cluster cpu-2proc",
            f"trainer launch {PARITY} --cluster 8gpu-zero2 --deepspeed ds.json",
        ),
    )
    _job_arguments(launch)
    _user_files(launch)
    launch.set_defaults(run=_launch)
    submit = commands.add_parser(
        "submit",
        help="render an sbatch script and submit it",
        epilog=examples(
            f"trainer submit {PARITY} --cluster 2node-16gpu-zero3 --dry-run",
            f"trainer submit {PARITY} --cluster 2node-16gpu-zero3",
        ),
    )
    _job_arguments(submit)
    _user_files(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    submit.set_defaults(run=_submit)
