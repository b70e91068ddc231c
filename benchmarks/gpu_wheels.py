"""`make gpu-wheels`: the packages a lent GPU machine lacks, as wheels in .whl/, for `make
gpu-check` to install there (that machine has torch, transformers and accelerate but no
package index; see benchmarks/gpu_check.py).

    python -m benchmarks.gpu_wheels [--python-version 3.12]

Each package is taken at the version installed here, so that the GPU check runs what the
tests here ran: a binary wheel for the GPU machine's Python and platform where PyPI has one,
else a wheel built here from the source distribution (pure-Python packages only: deepspeed
builds its ops just in time). MiniLM's config and tokenizer files (not its weights) go to
.whl/minilm/, for the models the check builds from config. The folder travels with the
working tree, whose limit is 64 MiB: the total is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from benchmarks.common import ROOT, folder_size

WHEELS = ROOT / ".whl"
# What the GPU machine's image lacks of our dependencies (and of theirs), and peft at our
# version. Not transformers (12 MB; the image's 5.x will do): bitsandbytes' wheel, with
# kernels for every CUDA version, alone takes 41 of the 64 MiB.
CARRIED = (
    "datasets",
    "dill",
    "multiprocess",
    "deepspeed",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "seqeval",
    "peft",
    "bitsandbytes",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
LIMIT_MB = 64


def download(name: str, python_version: str, folder: Path) -> None:
    """NAME==<version here> as a wheel for the GPU machine, else built here from source."""
    pinned = f"{name}=={version(name)}"
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder)]
    command += ["--only-binary=:all:", "--python-version", python_version]
    command += ["--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), pinned]
    if subprocess.run(command, capture_output=True).returncode == 0:
        return
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder), pinned]
    subprocess.run(build, check=True, env={**os.environ, "DS_BUILD_OPS": "0"})


def minilm_files(folder: Path) -> None:
    """all-MiniLM-L6-v2's config and tokenizer, without the weights."""
    from benchmarks.models import model_path

    source = Path(model_path())
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".onnx")):
            shutil.copy2(path, folder / path.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_wheels", description=__doc__)
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's (3.12)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".whl-") as scratch:
        staging = Path(scratch)
        for name in CARRIED:
            print(f"[gpu-wheels] {name}=={version(name)}", flush=True)
            download(name, args.python_version, staging)
        minilm_files(staging / "minilm")
        shutil.rmtree(WHEELS, ignore_errors=True)
        staging.rename(WHEELS)  # all or nothing: a half-filled .whl/ is never left
        staging.mkdir()  # for TemporaryDirectory's own clean-up
    size_mb = folder_size(WHEELS) / 2**20
    print(f"[gpu-wheels] {WHEELS}: {size_mb:.1f} MiB (the working tree may carry {LIMIT_MB})")
    return 0 if size_mb < LIMIT_MB else 1


if __name__ == "__main__":
    sys.exit(main())
