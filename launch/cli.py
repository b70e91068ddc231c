"""`trainer plan | launch | submit`: the sub-commands that start a job on a cluster profile.

Registered into the `trainer` command by trainer/cli.py; the work is in launch/plan.py,
launch/local.py and launch/slurm.py, imported only when the sub-command runs.
"""

from __future__ import annotations

import argparse


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML")
    parser.add_argument(
        "--cluster", required=True, help="profile: a shipped name (launch/clusters/) or a YAML file"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")


def _plan(args: argparse.Namespace) -> int:
    from launch.plan import plan

    print(plan(args.config, args.cluster, args.overrides))
    return 0


def _launch(args: argparse.Namespace) -> int:
    from launch.local import launch

    return launch(args.config, args.cluster, args.overrides)


def _submit(args: argparse.Namespace) -> int:
    from launch.slurm import submit

    return submit(args.config, args.cluster, args.overrides, dry_run=args.dry_run)


def add_commands(commands) -> None:
    """Add plan, launch and submit to the `trainer` sub-command parser."""
    plan = commands.add_parser("plan", help="batch, steps, backend settings, memory per device")
    _job_arguments(plan)
    plan.set_defaults(run=_plan)
    launch = commands.add_parser(
        "launch", help="start the processes on this machine (torchrun on CPU, accelerate on GPU)"
    )
    _job_arguments(launch)
    launch.set_defaults(run=_launch)
    submit = commands.add_parser("submit", help="render an sbatch script and submit it")
    _job_arguments(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    submit.set_defaults(run=_submit)
