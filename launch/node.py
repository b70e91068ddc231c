"""`python -m launch.node LAUNCHER...`: one node's launcher in a SLURM job, exiting with the
code of its training processes.

torchrun and `accelerate launch` exit with 1 when their processes exit with 75 (saved a
checkpoint and stopped early), which would hide the preemption from the batch script; run
through this, a node reports 75 then, and the script requeues the job (launch/requeue.py).
The script of `trainer submit` starts every node's launcher this way; so do the slurm/
templates.
"""

from __future__ import annotations

import os
import sys

from launch.local import run_streaming

USAGE = "python -m launch.node LAUNCHER [ARGUMENT ...]"


def main(argv: list[str] | None = None) -> int:
    """Run the launcher command in `argv` (stderr passed through) and return the exit code
    of its training processes (see launch.local.children_exit_code)."""
    command = sys.argv[1:] if argv is None else argv
    if not command or command[0].startswith("-"):
        print(f"error: usage: {USAGE}", file=sys.stderr)
        return 2
    try:
        return run_streaming(command, dict(os.environ))
    except OSError as err:  # the launcher itself could not start
        print(f"error: {command[0]}: {err.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
