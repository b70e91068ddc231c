"""Saving: the model in Hugging Face format (best/, final/) and the full training state
(checkpoints/step-N/), and loading the latter back.

Folders are written under a temporary name and renamed into place, so a crash during a
save never leaves a half-written `best/` or `final/` behind, and the previous one stays.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedTokenizerBase

from trainer import atomic
from trainer.config import RunConfig, dump_yaml
from trainer.errors import UserError
from trainer.model import adapters, labelled_base
from trainer.model.saved import CHECKPOINT_MODEL, RUN_CONFIG_NAME
from trainer.run.resume import sync_tree, write_commit

if TYPE_CHECKING:
    from trainer.run.setup import Run

LOOP_STATE_NAME = "loop_state.json"  # not HF Trainer's trainer_state.json: another schema
OLD_STATE_NAME = "trainer_state.json"  # what checkpoints were written with before
SCHEDULER_NAME = "scheduler.pt"


def _replace(tmp: Path, target: Path) -> None:
    """Put the complete folder `tmp` in place of `target`, durably: its files are on disk
    before the renames, and the renames before the old folder goes. A kill between the two
    renames leaves `target.old`; it is recovered first (see `recover_replaced`)."""
    recover_replaced(target)
    sync_tree(tmp)
    old = _old(target)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    atomic.sync_directory(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _old(target: Path) -> Path:
    return target.with_name(target.name + ".old")


def recover_replaced(target: Path) -> None:
    """Undo what a kill inside `_replace` left: beside a `target`, `target.old` is stale (it
    would make the next replacement fail with ENOTEMPTY); without a `target`, `target.old`
    is the complete previous folder (the best model so far), and goes back into place."""
    old = _old(target)
    if not old.is_dir():
        return
    if target.exists():
        shutil.rmtree(old)
    else:
        old.rename(target)
        atomic.sync_directory(target.parent)


COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to parameter names


def save_model(
    accelerator: Accelerator,
    model,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    cfg: RunConfig,
    home: Path | None = None,
) -> None:
    """Save weights (safetensors), tokenizer and run config so that
    `AutoModelFor*.from_pretrained(target)` and `pipeline(...)` load it on one device.
    `get_state_dict` gathers the full weights when they are sharded (ZeRO-3, FSDP); the
    names lose torch.compile's `_orig_mod.` so the folder loads into an uncompiled model.
    An adapter gets `base/` (trainer/model/labelled_base.py), through which pipeline and
    peft's loaders build the base with the run's labels; `home`: where `target` will be
    once renamed (a checkpoint's model/ is written inside step-N.partial), for its path."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state_dict = {name.removeprefix(COMPILED_PREFIX): t for name, t in state_dict.items()}
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if adapters.is_peft_model(unwrapped):
            labelled_base.write(unwrapped, tokenizer, tmp, home or target)
        (tmp / RUN_CONFIG_NAME).write_text(dump_yaml(cfg))
        _replace(tmp, target)
    accelerator.wait_for_everyone()


def save_checkpoint(
    accelerator: Accelerator, folder: Path, scheduler, state: dict, rank_state: dict, run: Run
) -> None:
    """Everything needed to continue exactly: model (or adapter), optimizer, grad scaler and
    per-process RNG states through Accelerate (weights as safetensors), the LR scheduler,
    the loop's counters (`state`, the same on every process) and this process's unlogged
    sums (`rank_state`), with the process count and backend that wrote it. Written to
    `step-N.partial`, committed (manifest last, after every process finished), then
    renamed: a crash at any point leaves no folder that resume would trust, and the
    previous checkpoint untouched. `model/` holds the model as final/ does (`save_model`
    of `run`), so `trainer evaluate` and `trainer export --checkpoint` open it mid-run."""
    partial = folder.with_name(folder.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    model = partial / CHECKPOINT_MODEL
    save_model(accelerator, run.model, run.tokenizer, model, run.cfg, folder / CHECKPOINT_MODEL)
    rank = accelerator.process_index
    (partial / f"trainer_rank_{rank}.json").write_text(json.dumps(rank_state))
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), partial / SCHEDULER_NAME)
        layout = {"processes": accelerator.num_processes, "backend": backend_of(accelerator)}
        (partial / LOOP_STATE_NAME).write_text(json.dumps({**state, **layout}, indent=1))
    # Each process flushes what its node wrote (on one node the first fsync does the work,
    # the others find the pages clean), so the marker never lands before the data.
    sync_tree(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_commit(partial)
        partial.rename(folder)
        atomic.sync_directory(folder.parent)  # durable before rotation deletes older ones
    accelerator.wait_for_everyone()


def read_loop_state(folder: Path) -> dict:
    """The loop state a checkpoint was saved with."""
    path = folder / LOOP_STATE_NAME
    if not path.is_file():  # a checkpoint from before the rename still resumes
        path = folder / OLD_STATE_NAME
    return json.loads(path.read_text())


def promote_best(run_dir: Path) -> None:
    """best/ becomes final/, by one rename; an adapter in it names final/base as its base
    first (a kill between the two leaves best/ to promote again: setup._complete_finish)."""
    best, final = run_dir / "best", run_dir / "final"
    labelled_base.moving(best, final)
    best.rename(final)
    atomic.sync_directory(run_dir)


def backend_of(accelerator: Accelerator) -> str:
    """How a checkpoint holds the model and optimizer: `deepspeed` (ZeRO's per-rank
    partitions), `fsdp` (torch.distributed.checkpoint shards) or `ddp` (full states, written
    by the main process: one process and DDP write the same files)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "fsdp" if kind == DistributedType.FSDP else "ddp"


def saved_layout(folder: Path) -> tuple[int, str | None]:
    """(processes, backend) that wrote the checkpoint. Checkpoints from before both were
    recorded: the count of their per-process files, and no backend."""
    state = read_loop_state(folder)
    if "processes" in state:
        return state["processes"], state["backend"]
    return len(list(folder.glob("trainer_rank_*.json"))), None


def check_layout(folder: Path, accelerator: Accelerator) -> None:
    """Refuse, before the model loads, a resume that could not continue the same run: under
    another backend (the files differ), or under ZeRO on another process count. DDP and
    FSDP resume on any count: full states load anywhere, torch.distributed.checkpoint
    reshards FSDP's shards on load, and streams deal their saved shards out again. ZeRO's
    partitions would need DeepSpeed's offline universal-checkpoint conversion."""
    processes, backend = saved_layout(folder)
    now, count = backend_of(accelerator), accelerator.num_processes
    where = f"train.resume: checkpoint {folder.name} was saved"
    if backend is not None and backend != now:
        raise UserError(
            f"{where} under {backend} and this run uses {now}; "
            f"resume it under {backend} (the cluster profile's backend)"
        )
    if now == "deepspeed" and processes != count:
        raise UserError(
            f"{where} by {processes} DeepSpeed processes and this run has {count}; ZeRO "
            f"state resumes only on {processes} (universal checkpoints are not supported)"
        )


def load_checkpoint(accelerator: Accelerator, folder: Path, scheduler) -> tuple[dict, list[dict]]:
    """Restore what `save_checkpoint` wrote; returns (loop state, every saved process's
    state, by rank: after a change of process count they do not map one to one).
    Our files and Accelerate's are read with `weights_only=True`, but DeepSpeed's states
    (`torch.load(weights_only=False)`) and FSDP's DCP `.metadata` (`pickle.load`) are
    pickles: a checkpoint from elsewhere needs train.resume_trusted (trainer.security)."""
    accelerator.load_state(str(folder))
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))
    state = read_loop_state(folder)
    processes, _ = saved_layout(folder)
    if processes != accelerator.num_processes:
        # Accelerate restored its micro-batch counter (a window ends at each multiple of
        # the accumulation steps) from the saving process, which accumulated over another
        # number of micro-batches: windows would end mid-step. Count them as this run would.
        accelerator.step = state["loop"]["step"] * accelerator.gradient_accumulation_steps
    ranks = [folder / f"trainer_rank_{rank}.json" for rank in range(processes)]
    return state, [json.loads(path.read_text()) for path in ranks]
