"""`torchrun ... tests/rank_faults.py MODE CONFIG`: `trainer train CONFIG` on every rank,
with one fault on rank 1 (what a test can not arrange from outside a process):

- `own-dir`: rank 1 trains into output_dir + "-rank1", as a node whose output_dir is on its
  own local disk would;
- `hang`: rank 1 never joins its first all-reduce (it sleeps instead).
"""

from __future__ import annotations

import os
import sys
import time

import torch.distributed

from trainer.cli import main

STARTED = "rank 0 entered its first all-reduce at"
EXITED = "rank 0 ended `trainer train` at"


def _sleep_instead(*args, **kwargs):
    time.sleep(600)


def _announce(original):
    def wrapper(*args, **kwargs):
        if not getattr(wrapper, "seen", False):
            wrapper.seen = True
            print(f"{STARTED} {time.time():.3f}", file=sys.stderr, flush=True)
        return original(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    mode, config = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    overrides = []
    if mode == "own-dir" and rank == 1:
        from trainer.config import load_config

        overrides = [f"output_dir={load_config(config).output_dir}-rank1"]
    if mode == "hang":
        patched = _sleep_instead if rank == 1 else _announce(torch.distributed.all_reduce)
        torch.distributed.all_reduce = patched
    code = main(["train", config, *overrides])
    print(f"{EXITED} {time.time():.3f}" if rank == 0 else "", file=sys.stderr, flush=True)
    sys.exit(code)
