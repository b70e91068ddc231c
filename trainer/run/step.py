"""One optimizer step: forward and backward over an accumulation window, then a decision
every process shares (skip a non-finite step; stop; save), then the update.

What a step reports are sums that add up from step to step until the next log line; they
are named here and packed into one tensor only to cross processes in one all-reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from accelerate import Accelerator

from trainer.run.forward import forward
from trainer.tasks.spec import Objective, TaskSpec


@dataclass
class StepSums:
    """Sums over optimizer steps on this process (tensors on its device): the task's loss
    and targets, real (non-padding) tokens, positions (padding included), the gradient
    norms (already equal on every process), per extra head (NSP) its loss and targets, and
    the values a spec's objective logs (preference rewards), summed per target."""

    loss: torch.Tensor
    targets: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    grad_norm: torch.Tensor
    head_loss: torch.Tensor  # one entry per extra head of the spec
    head_targets: torch.Tensor
    logged: torch.Tensor  # one entry per name in the spec's `logged`

    @classmethod
    def zeros(cls, heads: int, device: torch.device, logged: int = 0) -> StepSums:
        """Nothing summed yet."""
        scalars = [torch.zeros((), device=device) for _ in range(5)]
        per_head = [torch.zeros(heads, device=device) for _ in range(2)]
        return cls(*scalars, *per_head, torch.zeros(logged, device=device))

    def __iadd__(self, other: StepSums) -> StepSums:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def zero_(self) -> None:
        """Start the next log window."""
        for f in fields(self):
            getattr(self, f.name).zero_()

    def reduced(self, accelerator: Accelerator) -> StepSums:
        """The sums over all processes, in one all-reduce (the gradient norm as it is)."""
        summed = ("loss", "targets", "tokens", "positions")
        scalars = [getattr(self, n).view(1) for n in summed]
        total = accelerator.reduce(torch.cat([*scalars, self.heads_flat(), self.logged]), "sum")
        heads = total[4 : 4 + 2 * len(self.head_loss)].view(-1, 2)
        logged = total[4 + 2 * len(self.head_loss) :]
        return StepSums(*total[:4], self.grad_norm, heads[:, 0], heads[:, 1], logged)

    def heads_flat(self) -> torch.Tensor:
        """[loss, targets] of each head in turn."""
        return torch.stack([self.head_loss, self.head_targets], dim=1).reshape(-1)

    def tolist(self) -> list[float]:
        """For checkpoints: [loss, targets, tokens, grad norm, positions, then loss and
        targets of each head, then the logged values] (the order checkpoints have always
        used, the logged values last)."""
        scalars = [self.loss, self.targets, self.tokens, self.grad_norm, self.positions]
        return [*(float(t) for t in scalars), *self.heads_flat().tolist(), *self.logged.tolist()]

    @classmethod
    def from_list(cls, values: list[float], device: torch.device, logged: int = 0) -> StepSums:
        """The sums a checkpoint saved with `tolist` (`logged`: how many values end it)."""
        t = torch.tensor(values, device=device)
        heads = t[5 : len(t) - logged].view(-1, 2)
        tail = t[len(t) - logged :].clone()
        return cls(t[0], t[1], t[2], t[4], t[3], heads[:, 0].clone(), heads[:, 1].clone(), tail)


@dataclass(frozen=True)
class Requests:
    """What a process asks of all before a step; after it, what any process asked."""

    stop: bool = False  # a signal or train.max_time: save and leave
    save: bool = False  # checkpoint.every_minutes has passed

    def flags(self) -> list[float]:
        return [float(getattr(self, f.name)) for f in fields(self)]


@dataclass
class StepResult:
    """What one optimizer step reports."""

    sums: StepSums  # zeros when the step was skipped
    skipped: bool  # non-finite loss or gradient norm on some process: no update
    requests: Requests  # raised by any process


def optimizer_step(
    model,
    window: list[dict],
    spec: TaskSpec,
    accelerator: Accelerator,
    optimizer,
    scheduler,
    max_grad_norm: float,
    requests: Requests = Requests(),
    class_weights: torch.Tensor | None = None,
    objective: Objective | None = None,
) -> StepResult:
    """Forward/backward over the accumulation window, then clip and step.

    The loss is normalised by the number of targets in the whole window on all processes:
    each micro-batch's summed loss is scaled so that, after Accelerate divides by the
    accumulation steps and DDP averages over processes, the gradient is that of
    sum(all target losses) / (all targets). Each extra head (NSP) is normalised the same
    way by its own targets and added. Before the update one all-reduce tells every
    process whether any saw a non-finite loss or gradient norm (then nobody steps) and
    which `requests` any raised; under DeepSpeed, whose engine steps inside the last
    backward, that decision comes before it (see `_poisoned_if`). With `class_weights` the
    targets count by their class weight (see data/class_weights.py)."""
    device = accelerator.device
    counts = _window_counts(window, spec, class_weights)
    all_counts = accelerator.reduce(counts.clone(), "sum").clamp(min=1)  # reduce is in place
    scales = accelerator.num_processes * len(window) / all_counts
    totals = torch.zeros(len(counts), device=device)  # loss sums: the task's, each head's
    logged = torch.zeros(len(spec.logged), device=device)
    engine = deepspeed_engine(accelerator)
    decided = None
    for batch in window:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                parts, values = _loss_parts(model, batch, spec, class_weights, objective)
            totals += parts.detach()
            logged += values
            loss = (parts * scales).sum()
            if engine is not None and accelerator.sync_gradients:
                decided = _agree(accelerator, totals, None, requests)
                loss = _poisoned_if(decided[0], loss)
            accelerator.backward(loss)  # DeepSpeed: the engine steps in here at the boundary
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    grad_norm = torch.as_tensor(0.0 if norm is None else norm, device=device).float()
    if decided is None:
        skipped, raised = _agree(accelerator, totals, grad_norm, requests)
    else:
        skipped, raised = decided
        _check_engine_skipped(engine, skipped)
        skipped |= not engine.was_step_applied() and not engine.fp16_enabled()
    _update(accelerator, optimizer, scheduler, skipped)
    tokens = sum(real_tokens(b) for b in window).float()
    positions = tokens.new_tensor(sum(b["input_ids"].numel() for b in window))
    sums = StepSums(
        totals[0], counts[0], tokens, positions, grad_norm, totals[1:], counts[1:], logged
    )
    if skipped:
        sums.zero_()
    return StepResult(sums, skipped, raised)


def _window_counts(window: list[dict], spec: TaskSpec, class_weights) -> torch.Tensor:
    """The window's targets on this process: the task's, then each extra head's."""
    targets = sum(spec.targets(b, class_weights) for b in window)
    head_counts = [sum(head.count(b) for b in window).float() for head in spec.extra_heads]
    return torch.stack([targets.float(), *head_counts])


def _loss_parts(
    model, batch: dict, spec: TaskSpec, class_weights, objective: Objective | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's loss sums (the task's, then each extra head's) and the sums of the
    values the objective logs (none without one)."""
    if objective is not None:
        loss_sum, _, values = objective(model, batch)
        return loss_sum.view(1), values.detach()
    output, labels = forward(model, batch, spec.targets_only)
    loss_sum, _ = spec.loss(output[spec.logits_key], labels, class_weights)
    parts = torch.stack([loss_sum, *(head.loss(output, batch)[0] for head in spec.extra_heads)])
    return parts, loss_sum.new_zeros(0)


def _update(accelerator: Accelerator, optimizer, scheduler, skipped: bool) -> None:
    """The optimizer and schedule step (no-ops for the optimizer under DeepSpeed, whose
    engine stepped in `backward`), or for a skipped fp16 step the grad scaler's update:
    `clip_grad_norm_` has unscaled the gradients, and until `update()` the scaler refuses
    to unscale again ("unscale_() has already been called") at the next step."""
    if not skipped:
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
    elif accelerator.scaler is not None:
        accelerator.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _agree(
    accelerator: Accelerator,
    totals: torch.Tensor,
    grad_norm: torch.Tensor | None,
    requests: Requests,
) -> tuple[bool, Requests]:
    """One all-reduce: whether any process saw a non-finite value (then nobody steps),
    and which requests any process raised. Without a `grad_norm` (DeepSpeed decides before
    it computes one) only the losses count."""
    bad = ~torch.isfinite(totals).all()
    if grad_norm is not None and accelerator.scaler is None:  # fp16: the scaler sees inf
        bad |= ~torch.isfinite(grad_norm)
    flags = torch.tensor([float(bad), *requests.flags()], device=accelerator.device)
    skipped, *raised = (accelerator.reduce(flags, "sum") > 0).tolist()
    return skipped, Requests(*raised)


def deepspeed_engine(accelerator: Accelerator):
    """The DeepSpeed engine the model was prepared into, or None without DeepSpeed."""
    wrapper = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapper is None else wrapper.engine


def _poisoned_if(skip: bool, loss: torch.Tensor) -> torch.Tensor:
    """The window's last loss, NaN when the step is to be skipped.

    Accelerate's DeepSpeed `backward` runs the engine's `step()` on the last micro-batch, so
    the shared decision is taken before that backward. DeepSpeed has no call that drops the
    gradients it has reduced into its partitions; its own overflow path does (ZeRO-1/2/3
    discard them, leave weights, optimizer state and the engine's schedule alone, and count
    a skipped step). A NaN gradient, which every process gets from the all-reduce, takes
    that path: ZeRO-3 and ZeRO-1/2 in fp32 always treat a non-finite norm as overflow, bf16
    does with `check_grad_overflow` (its default), fp16 with its loss scaler."""
    return loss * math.nan if skip else loss


def _check_engine_skipped(engine, skipped: bool) -> None:
    """A skipped step must not have reached the weights (see `_poisoned_if`)."""
    if skipped and engine.was_step_applied():
        raise RuntimeError(  # a DeepSpeed JSON that switches its overflow checks off
            "DeepSpeed applied an update the run skipped as non-finite: keep "
            "bf16.check_grad_overflow and zero_optimization.compute_grad_norm on"
        )


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens that are not padding: a padded batch's attention mask says which, or for
    packed sft rows under a 4-D document mask their `real_mask`; packed MLM/CLM blocks
    have no padding."""
    mask = batch["real_mask"] if "real_mask" in batch else batch["attention_mask"]
    return mask.sum() if mask.dim() == 2 else mask.new_tensor(batch["input_ids"].numel())
