"""Saving: the model in Hugging Face format (best/, final/) and the full training state
(checkpoints/step-N/), and loading the latter back.

Folders are written under a temporary name and renamed into place, so a crash during a
save never leaves a half-written `best/` or `final/` behind, and the previous one stays.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from trainer import atomic
from trainer.config import RunConfig, dump_yaml
from trainer.errors import TrainingFailed, UserError
from trainer.model import adapters, carried, labelled_base
from trainer.model.card import write_card
from trainer.model.saved import CHECKPOINT_MODEL, RUN_CONFIG_NAME
from trainer.run.resume import LOOP_STATE_NAME, read_loop_state, sync_tree, write_commit

if TYPE_CHECKING:
    from trainer.run.setup import Run

SCHEDULER_NAME = "scheduler.pt"
WEIGHTS_NAME = "model.safetensors"  # Accelerate's and save_pretrained's, for one model
# a checkpoint's model/ with carried tensors: the linked weights, then those tensors
CARRIED_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


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
    card: ModelCard | None = None,
) -> None:
    """Save weights (safetensors), tokenizer and run config so that
    `AutoModelFor*.from_pretrained(target)` and `pipeline(...)` load it on one device.
    `get_state_dict` gathers the full weights when they are sharded (ZeRO-3, FSDP); the
    names lose torch.compile's `_orig_mod.` so the folder loads into an uncompiled model.
    An adapter gets `base/` (trainer/model/labelled_base.py), through which pipeline and
    peft's loaders build the base with the run's labels; `home`: where `target` will be
    once renamed (a checkpoint's model/ is written inside step-N.partial), for its path;
    `card`: its README.md (final/'s), in place before the folder is. A full disk removes
    the half-written `target.tmp` and stops (TrainingFailed); the previous `target` stays."""
    state_dict = accelerator.get_state_dict(model)
    tmp = target.with_name(target.name + ".tmp")
    reason = None
    if accelerator.is_main_process:
        state_dict = {name.removeprefix(COMPILED_PREFIX): t for name, t in state_dict.items()}
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        write = (unwrapped, state_dict, tokenizer, tmp, cfg, home or target, card)
        reason = _attempt(target, _write_model, *write)
        if reason is None:
            reason = _attempt(target, _replace, tmp, target)
    _stop_if_any_failed(accelerator, str(target), reason, tmp)


def _write_model(
    unwrapped,
    state_dict: dict,
    tokenizer,
    tmp: Path,
    cfg: RunConfig,
    home: Path,
    card: ModelCard | None = None,
) -> None:
    """The files of a model folder in `tmp`, which becomes `home` (an adapter's base/ is
    named by that path); an empty `state_dict` writes everything but the weights. A full
    model's weights include what it carries from its source (trainer/model/carried.py)."""
    if state_dict and not adapters.is_peft_model(unwrapped):
        state_dict = {**carried.tensors(unwrapped), **state_dict}
    unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if adapters.is_peft_model(unwrapped):
        labelled_base.write(unwrapped, tokenizer, tmp, home)
    (tmp / RUN_CONFIG_NAME).write_text(dump_yaml(cfg))
    if card is not None:
        write_card(tmp, card)


def _attempt(what: Path, write: Callable[..., None], *args) -> str | None:
    """Run `write(*args)`; why it failed when the file system refused it (a full disk, a size
    limit, an unwritable folder), None when it succeeded. Anything else propagates."""
    try:
        write(*args)
    except Exception as err:
        reason = atomic.write_failure(err, what)
        if reason is None:
            raise
        return reason
    return None


def _stop_if_any_failed(
    accelerator: Accelerator, what: str, reason: str | None, half_written: Path
) -> None:
    """All processes learn whether a write failed on any of them (one all-reduce, where the
    barrier was), so that none waits for the others forever; then the half-written folder
    goes and every process stops with TrainingFailed (exit 3), what was committed before
    untouched."""
    failed = torch.tensor([float(reason is not None)], device=accelerator.device)
    if accelerator.reduce(failed, "sum").item() == 0:
        return
    if accelerator.is_main_process:
        shutil.rmtree(half_written, ignore_errors=True)
    raise TrainingFailed(
        atomic.failed_write_message(what, reason or "a write failed on another process")
    )


def save_checkpoint(
    accelerator: Accelerator, folder: Path, scheduler, state: dict, rank_state: dict, run: Run
) -> None:
    """Everything needed to continue exactly: model (or adapter), optimizer, grad scaler and
    per-process RNG states through Accelerate (weights as safetensors), the LR scheduler,
    the loop's counters (`state`, the same on every process) and this process's unlogged
    sums (`rank_state`), with the process count and backend that wrote it; and `model/`,
    which `trainer evaluate` and `trainer export --checkpoint` open mid-run
    (`_write_checkpoint_model`). Written to `step-N.partial`, committed (manifest last,
    after every process finished), then renamed: a crash at any point leaves no folder
    that resume would trust, and the previous checkpoint untouched. A write refused on any
    process (a full disk) removes the partial folder and stops every process with
    TrainingFailed."""
    partial = folder.with_name(folder.name + ".partial")
    what = f"checkpoint {folder}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    reason = _attempt(folder, _write_state, accelerator, partial, scheduler, state, rank_state)
    _stop_if_any_failed(accelerator, what, reason, partial)
    reason = _write_checkpoint_model(accelerator, run, partial, folder)
    _stop_if_any_failed(accelerator, what, reason, partial)
    if accelerator.is_main_process:
        reason = _attempt(folder, _commit, partial, folder)
    _stop_if_any_failed(accelerator, what, reason, partial)


def _write_checkpoint_model(
    accelerator: Accelerator, run: Run, partial: Path, folder: Path
) -> str | None:
    """`partial/model/`, a model folder like final/, at what it costs on top of the state
    just saved: an adapter in full (a few MB; gathered from every process first, as for
    final/); a full model under DDP without weights of its own: Accelerate's
    `model.safetensors` in the checkpoint, under the tensor names save_pretrained writes,
    is hard-linked in (stored once; the link survives the rename); nothing for a full
    model under ZeRO / FSDP, whose sharded weights every save would otherwise gather onto
    one process (trainer/model/saved.py says so to whoever opens the checkpoint).
    Returns why a write failed on this process, None when none did."""
    unwrapped = accelerator.unwrap_model(run.model, keep_torch_compile=False)
    adapter = adapters.is_peft_model(unwrapped)
    if not adapter and backend_of(accelerator) != "ddp":
        return None
    state_dict = accelerator.get_state_dict(run.model) if adapter else {}
    if not accelerator.is_main_process:
        return None
    state_dict = {name.removeprefix(COMPILED_PREFIX): t for name, t in state_dict.items()}
    target, home = partial / CHECKPOINT_MODEL, folder / CHECKPOINT_MODEL
    write = (unwrapped, state_dict, run.tokenizer, target, run.cfg, home)
    reason = _attempt(folder, _write_model, *write)
    if reason is None and not adapter:
        extra = carried.tensors(unwrapped)
        reason = _attempt(folder, _link_weights, partial / WEIGHTS_NAME, target, extra)
    if reason is None:
        reason = _attempt(folder, sync_tree, target)
    return reason


def _link_weights(weights: Path, model_dir: Path, extra: dict[str, torch.Tensor]) -> None:
    """Hard-link the checkpoint's `weights` into `model_dir`; with tensors the model carries
    from its source (a pooler the MLM model has no place for), as the first of two shards
    next to a second holding those, joined by the index transformers loads: a folder
    holding `model.safetensors` would be read as one file, the carried shard ignored."""
    if not extra:
        os.link(weights, model_dir / WEIGHTS_NAME)
        return
    own, carried_shard = CARRIED_SHARDS
    os.link(weights, model_dir / own)
    save_file(extra, model_dir / carried_shard, metadata={"format": "pt"})
    with safe_open(str(weights), framework="pt") as handle:
        weight_map = dict.fromkeys(handle.keys(), own)
    weight_map.update(dict.fromkeys(extra, carried_shard))
    index = {"metadata": {}, "weight_map": weight_map}
    atomic.write_json(model_dir / f"{WEIGHTS_NAME}.index.json", index)


def _write_state(
    accelerator: Accelerator, partial: Path, scheduler, state: dict, rank_state: dict
) -> None:
    """This process's part of a checkpoint, flushed to disk."""
    accelerator.save_state(str(partial), safe_serialization=True)
    rank = accelerator.process_index
    (partial / f"trainer_rank_{rank}.json").write_text(json.dumps(rank_state))
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), partial / SCHEDULER_NAME)
        layout = {"processes": accelerator.num_processes, "backend": backend_of(accelerator)}
        (partial / LOOP_STATE_NAME).write_text(json.dumps({**state, **layout}, indent=1))
    # Each process flushes what its node wrote (on one node the first fsync does the work,
    # the others find the pages clean), so the marker never lands before the data.
    sync_tree(partial)


def _commit(partial: Path, folder: Path) -> None:
    """The manifest last, then the rename, durable before rotation deletes older ones."""
    write_commit(partial)
    partial.rename(folder)
    atomic.sync_directory(folder.parent)


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
