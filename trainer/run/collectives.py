"""A collective that timed out, said in one line: which one, called from where.

Every process group of a run gets `train.collective_timeout` (make_accelerator), so a
process that never joins a collective (hung in I/O, stuck in a data loader, dead without
its group noticing) fails the job within minutes instead of torch's 30. NCCL's watchdog
then names the operation itself (`WorkNCCL(SeqNum=.., OpType=ALLREDUCE, ..)`, and with
TORCH_NCCL_DUMP_ON_TIMEOUT the flight recorder dumps the last collectives per rank); gloo
only says "Timed out waiting 5000ms for recv operation", so the operation is read from the
traceback here: the torch.distributed function that was waiting, and our code that called it.
"""

from __future__ import annotations

import traceback
from pathlib import Path

_C10D = "distributed_c10d.py"
_PACKAGE = str(Path(__file__).resolve().parents[1])  # trainer/: our code, not the libraries'


def timed_out_collective(error: BaseException, timeout_s: float) -> str | None:
    """One line naming the collective that timed out, or None if `error` is no such
    timeout (torch raises a plain RuntimeError, or its DistBackendError subclass)."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return None
    frames = traceback.extract_tb(error.__traceback__)
    waiting = [frame for frame in frames if frame.filename.endswith(_C10D)]
    if not waiting:
        return None
    ours = [frame for frame in frames if frame.filename.startswith(_PACKAGE)]
    where = ""
    if ours:
        caller = ours[-1]
        where = f" called from {Path(caller.filename).name}:{caller.lineno} ({caller.name})"
    return (
        f"collective {waiting[0].name}{where} timed out after {timeout_s:g} s "
        "(train.collective_timeout): another process never joined it; see that process's "
        f"log for where it hangs ({text.splitlines()[0][:200]})"
    )
