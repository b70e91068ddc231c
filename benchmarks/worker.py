"""The one entry point of every benchmark process that is not our engine's CLI:
`python -m benchmarks.worker NAME SPEC_JSON OUT_JSON` (started by `common.run_worker`).

A section runs such a side in a fresh process to time the whole job (start-up and imports
included) and read its own peak memory, as the engine's own runs are. The worker calls the
function NAME stands for with the spec and writes what it returns to OUT_JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

# NAME: (module, function); imported only in the process that runs it
WORKERS = {
    "hf": ("benchmarks.hf_reference", "train"),
    "handwritten": ("benchmarks.hardware", "handwritten_loop"),
    "naive": ("benchmarks.inference", "naive_job"),
    "cli": ("benchmarks.qlora_layout", "cli_variant"),
    "multitask": ("benchmarks.multitask_adapters", "load_job"),
    "trl_sft": ("benchmarks.sft", "trl_job"),
    "trl_dpo": ("benchmarks.dpo", "trl_job"),
}


def main(argv: list[str]) -> int:
    """Run one worker; its JSON-serialisable result goes to the output file."""
    name, spec, out = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    module, function = WORKERS[name]
    result = getattr(importlib.import_module(module), function)(json.loads(spec))
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
