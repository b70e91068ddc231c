"""Generation at evaluation (eval.generate): the first N validation prompts answered
greedily, written to RUN_DIR/samples.jsonl and, where the rows carry reference answers,
scored by exact match and a normalised contains.

A loss says how likely the answers are; only generating shows whether the model answers,
and stops. Each prompt is the token sequence the model saw in training before its answer
(the task's `eval_prompt`), so a sample asks exactly what training taught.

samples.jsonl is appended by the main process like metrics.jsonl (run/records.py): one
record per sample per evaluation, a torn last line dropped on reading, and on resume the
records after the checkpoint's step go (run/resume.py truncate_metrics).
"""

from __future__ import annotations

import functools
import json
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from trainer import atomic
from trainer.config import DataConfig, RunConfig
from trainer.data.read import Split, read_split
from trainer.run.records import finite
from trainer.tasks.spec import TaskSpec

if TYPE_CHECKING:
    from trainer.run.setup import Run

SAMPLES_NAME = "samples.jsonl"


@dataclass(frozen=True)
class Prompt:
    """One prompt to answer: its tokens, their text as the model saw it (special tokens
    and the template included), and the reference answer when the row has one."""

    ids: list[int]
    text: str
    reference: str | None


def prompts_of(
    split: Split, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, data: DataConfig, count: int
) -> list[Prompt]:
    """The first `count` rows of `split` that give a prompt (rows data.truncation=drop
    leaves out give none)."""
    if spec.eval_prompt is None:
        return []
    prompts = []
    for row in split.rows:
        if len(prompts) == count:
            break
        made = spec.eval_prompt(tokenizer, row, data)
        if made is not None:
            ids, reference = made
            prompts.append(Prompt(ids, tokenizer.decode(ids), reference))
    return prompts


def validation_prompts(
    cfg: RunConfig, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase
) -> list[Prompt]:
    """The prompts eval.generate answers at each evaluation in training (none when off).
    The encoded validation set holds no row text (it may be packed, or trained on the
    prompt too), so the rows are read again: data.validation alone, or the split carved
    from train exactly as training carved it."""
    if cfg.eval.generate <= 0:
        return []
    if cfg.data.validation:
        split = read_split(cfg.data.validation, "data.validation", spec.rows, cfg.data)
    else:
        from trainer.data.prepare import read_splits

        split = read_splits(cfg)[1]
    return prompts_of(split, spec, tokenizer, cfg.data, cfg.eval.generate)


def _stop_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS and whatever the model's generation config also ends on (an end-of-turn)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *extra] if i is not None})


@torch.no_grad()
def _answer(
    model: torch.nn.Module,
    prompts: list[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers of one batch, the prompts padded on the left (so that every answer
    starts at the same position), each cut at its first stop token."""
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    width = max(len(p.ids) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in prompts])
    mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts])
    with accelerator.autocast():
        output = model.generate(
            input_ids=ids.to(accelerator.device),
            attention_mask=mask.to(accelerator.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=pad,
            use_cache=True,
        )
    answers = []
    for row in output[:, width:].tolist():
        ends = [n for n, token in enumerate(row) if token in stop]
        answers.append(tokenizer.decode(row[: ends[0] if ends else None], skip_special_tokens=True))
    return answers


def generate_samples(
    model: torch.nn.Module,
    prompts: list[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
    max_new_tokens: int,
    batch_size: int,
) -> list[dict]:
    """Every prompt answered, in order, on every process: each process answers its share
    (prompts rank, rank + world, ...) and the shares are gathered. Every process makes as
    many generate calls (one with no share of its own answers prompt 0 and drops it),
    because under ZeRO-3 / FSDP each forward pass gathers weights from all processes."""
    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(prompts), world))
    calls = math.ceil(math.ceil(len(prompts) / world) / batch_size)
    answered = []
    for call in range(calls):
        indices = mine[call * batch_size : (call + 1) * batch_size]
        batch = [prompts[i] for i in indices] or prompts[:1]
        answers = _answer(unwrapped, batch, tokenizer, accelerator, max_new_tokens)
        answered += zip(indices, answers[: len(indices)], strict=True)
    model.train(was_training)
    samples = []
    for index, generated in sorted(gather_object(answered)):
        prompt = prompts[index]
        sample = {"prompt": prompt.text}
        if prompt.reference is not None:
            sample["reference"] = prompt.reference
        samples.append({**sample, "generated": generated})
    return samples


def normalise(text: str) -> str:
    """Lower case, runs of whitespace as one space, punctuation at either end stripped:
    "  Kiwi  grey fox." and "kiwi grey fox" are the same answer."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def answer_scores(samples: list[dict]) -> dict[str, float]:
    """exact_match: share of answers equal to their reference; contains: share whose
    reference is inside the answer (a right answer with more after it), both normalised.
    Over the samples with a reference; none: no scores."""
    scored = [
        (normalise(s["generated"]), normalise(s["reference"])) for s in samples if "reference" in s
    ]
    if not scored:
        return {}
    return {
        "exact_match": sum(g == r for g, r in scored) / len(scored),
        "contains": sum(r in g for g, r in scored) / len(scored),
    }


def append_samples(path: Path, step: int, samples: list[dict], accelerator: Accelerator) -> None:
    """One record per sample, appended by the main process in one write. A full disk stops
    the run (TrainingFailed) with the file as it was before this evaluation's records."""
    if not accelerator.is_main_process or not samples:
        return
    text = "".join(json.dumps(finite({"step": step, **s})) + "\n" for s in samples)
    size = path.stat().st_size if path.exists() else 0
    undo = functools.partial(os.truncate, path, size)
    with atomic.stop_on_failed_write(path, undo), path.open("a", encoding="utf-8") as handle:
        handle.write(text)


def record_samples(run: Run, prompts: list[Prompt], step: int) -> dict[str, float]:
    """An evaluation's samples in training: answered, appended to samples.jsonl, scored."""
    eval_cfg = run.cfg.eval
    samples = generate_samples(
        run.model,
        prompts,
        run.tokenizer,
        run.accelerator,
        eval_cfg.max_new_tokens,
        eval_cfg.batch_size,
    )
    append_samples(run.run_dir / SAMPLES_NAME, step, samples, run.accelerator)
    return answer_scores(samples)
