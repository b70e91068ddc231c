"""`trainer train`: one loop for every task, read top to bottom.

The loop runs optimizer steps over global batches (see data/sampling.py), logs, evaluates
and keeps the best model, checkpoints on schedule and on request, and leaves `final/`.
What differs between tasks lives in the task spec; the set-up is in run/setup.py and one
optimizer step in run/step.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field

import torch

from trainer import atomic
from trainer.config import RunConfig, dump_yaml, to_dict
from trainer.durations import parse_duration
from trainer.errors import TrainingFailed, UserError
from trainer.logs import get_logger
from trainer.model.card import CARD_NAME, finished_run_card, write_card
from trainer.run.checkpoint import load_checkpoint, promote_best, save_checkpoint, save_model
from trainer.run.evaluation import evaluate
from trainer.run.forward import to_device
from trainer.run.records import finite
from trainer.run.resume import checkpoint_dir, rotate, truncate_metrics
from trainer.run.samples import SAMPLES_NAME, Prompt, record_samples, validation_prompts
from trainer.run.setup import Run, set_up
from trainer.run.step import Requests, StepSums, optimizer_step
from trainer.run.stop import Preempted, StopFlag
from trainer.run.tracking import RunLog
from trainer.tasks.spec import LOWER_IS_BETTER, TaskSpec

logger = get_logger(__name__)


@dataclass
class Best:
    """Best evaluation so far by `eval.metric`, and how many evaluations since it improved."""

    metric: str
    value: float | None = None
    results: dict | None = None
    step: int = 0
    stale: int = 0

    def update(self, results: dict, step: int, min_delta: float = 0.0) -> bool:
        """Record an evaluation; True when it is the new best. A non-finite value (a NaN
        evaluation) is never the best, not even the first: it counts as not improving.
        `stale` restarts only on a gain above `min_delta` (eval.early_stopping_min_delta):
        a noisy metric that creeps up by a hair is still the best model, but keeps the
        patience running, as Trainer's EarlyStoppingCallback threshold does."""
        value = results[self.metric]
        if not math.isfinite(value):
            self.stale += 1
            return False
        lower = self.metric in LOWER_IS_BETTER
        gain = None if self.value is None else (self.value - value if lower else value - self.value)
        self.stale = 0 if gain is None or gain > min_delta else self.stale + 1
        if gain is None or gain > 0:
            self.value, self.results, self.step = value, results, step
            return True
        return False


@dataclass
class LoopState:
    """The loop's position and memory: saved in every checkpoint, the same on all ranks."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    evaluated_at: int = -1
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    train_loss: float | None = None
    best: dict = field(default_factory=dict)
    elapsed_s: float = 0.0  # the training clock (RunLog.elapsed), continued by a resume
    logged_at_s: float = 0.0  # that clock at the last log line (for tokens_per_s)
    save_s: float = 0.0  # the longest save before this checkpoint (for train.max_time)


def train(cfg: RunConfig, stop_flag: StopFlag | None = None) -> dict:
    """Run training as configured; returns the metrics written to eval_results.json.
    `stop_flag`: the one `trainer train` installed at process start (see run/stop.py)."""
    stop_flag = stop_flag or StopFlag().install()
    run = set_up(cfg)
    _write_run_files(run)
    loop = Loop.start(run, stop_flag)
    state, early_stop = loop.state, False
    run.model.train()
    try:
        while state.step < run.total_steps and not early_stop:
            batches = run.train_batches(state.epoch, state.step_in_epoch)
            while state.step_in_epoch < run.plan.steps_per_epoch:
                requests = loop.step(batches)  # raises TrainingFailed on too many faults
                loop.log_if_due()
                early_stop = loop.evaluate_if_due()
                loop.checkpoint_if_due(requests)
                if requests.stop:
                    _stop_preempted(run, loop.stop_flag.reason or "a signal on another process")
                if early_stop or state.step >= run.total_steps:
                    break
            early_stop = loop.end_of_epoch() or early_stop
            loop.checkpoint_at_epoch_end(done=early_stop or state.step >= run.total_steps)
    except UserError:  # a streamed row read mid-run: its error line starts a line of its own
        loop.log.progress.close()
        raise
    if run.validation_set is not None and state.evaluated_at != state.step:
        loop.evaluate_and_keep_best()
    results = _finish(run, loop.best, state)
    loop.log.close()  # ends the trackers and, under torchrun, the process group: last
    return results


def _write_run_files(run: Run) -> None:
    """config.yaml and run_summary.json (the summary printed too), by the main process."""
    if run.accelerator.is_main_process:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic.stop_on_failed_write(run.run_dir / "config.yaml"):
            atomic.write_text(run.run_dir / "config.yaml", dump_yaml(run.cfg))
        with atomic.stop_on_failed_write(run.run_dir / "run_summary.json"):
            atomic.write_json(run.run_dir / "run_summary.json", finite(run.summary()), indent=2)
        logger.info(json.dumps(run.summary()))
        if line := run.head_warmup.line():
            logger.info(line)
        if run.cfg.model.trust_remote_code:
            logger.warning("model.trust_remote_code is on: code from the model repo runs here")
    run.accelerator.wait_for_everyone()


@dataclass
class Loop:
    """What the loop works with from step to step: the run, its state, the best evaluation
    so far, the sums since the last log line, the log, the stop flag and when it last saved."""

    run: Run
    state: LoopState
    best: Best
    since_log: StepSums
    log: RunLog
    stop_flag: StopFlag
    last_save: float = field(default_factory=time.monotonic)
    saved_step: int = -1  # the step of the newest checkpoint: never saved twice
    prompts: list[Prompt] = field(default_factory=list)  # eval.generate's, in row order

    @classmethod
    def start(cls, run: Run, stop_flag: StopFlag) -> Loop:
        """Fresh, or from the checkpoint being resumed (metrics.jsonl and samples.jsonl are
        cut back to its step, so the continued log has no duplicated or missing steps)."""
        state, best = LoopState(), Best(run.cfg.eval_metric)
        since_log = StepSums.zeros(
            len(run.spec.extra_heads), run.accelerator.device, len(run.spec.logged)
        )
        if run.resume_from is not None:
            loading = time.monotonic()
            saved, ranks = load_checkpoint(run.accelerator, run.resume_from, run.scheduler)
            state = LoopState(**saved["loop"])
            # until this process saves, a save is taken to last as long as the load did
            stop_flag.budget.save_s = max(state.save_s, time.monotonic() - loading)
            best = Best(**state.best) if state.best else best
            since_log = restored_sums(run, [rank["since_log"] for rank in ranks])
            if run.stream is not None:
                run.stream.load_state_dict([rank["stream"] for rank in ranks])
            if run.accelerator.is_main_process:
                truncate_metrics(run.run_dir / "metrics.jsonl", state.step)
                truncate_metrics(run.run_dir / SAMPLES_NAME, state.step)
                logger.info("resuming from %s (step %d)", run.resume_from, state.step)
        max_time = run.cfg.train.max_time
        stop_flag.limit_time(parse_duration(max_time) if max_time else None)
        stop_flag.install()  # again: in case set-up's libraries installed handlers of their own
        _stop_if_asked_during_set_up(run, stop_flag, state.step)
        resumed = run.resume_from is not None
        log = RunLog(
            run.accelerator,
            run.run_dir,
            run.cfg,
            run.total_steps,
            state.step,
            state.elapsed_s,
            resumed,
        )
        saved_step = state.step if resumed else -1
        prompts = validation_prompts(run.cfg, run.spec, run.tokenizer)
        return cls(
            run, state, best, since_log, log, stop_flag, saved_step=saved_step, prompts=prompts
        )

    # --- one optimizer step, and the faults it may bring
    def step(self, batches) -> Requests:
        """Train one global batch; what any process requested (stop, save)."""
        run, state = self.run, self.state
        started = time.monotonic()
        window = [
            to_device(next(batches), run.accelerator.device)
            for _ in range(run.plan.accumulation_steps)
        ]
        minutes = run.cfg.checkpoint.every_minutes
        save_due = bool(minutes) and started - self.last_save > 60 * minutes
        stop = self.stop_flag.requested(self._evaluates_after_next_step())
        result = optimizer_step(
            run.model,
            window,
            run.spec,
            run.accelerator,
            run.optimizer,
            run.scheduler,
            run.cfg.train.max_grad_norm,
            Requests(stop=stop, save=save_due),
            run.class_weights,
            run.objective,
        )
        self.stop_flag.budget.note_step(time.monotonic() - started)
        self.since_log += result.sums
        state.step += 1
        state.step_in_epoch += 1
        self._count_fault(result.skipped)
        return result.requests

    def _evaluates_after_next_step(self) -> bool:
        """Whether the coming step is followed by an evaluation (the time budget keeps
        room for it)."""
        run, state = self.run, self.state
        every = run.cfg.eval.every_steps
        if run.validation_set is None:
            return False
        if every:
            return (state.step + 1) % every == 0
        return state.step_in_epoch + 1 == run.plan.steps_per_epoch

    def _count_fault(self, skipped: bool) -> None:
        """A non-finite step was skipped on every process: stop when the config says so."""
        state, cfg = self.state, self.run.cfg.train
        if not skipped:
            state.nonfinite_in_a_row = 0
            return
        state.skipped_steps += 1
        state.nonfinite_in_a_row += 1
        self.log.warn(
            f"non-finite loss or gradient norm at step {state.step}: the update was skipped "
            f"on all processes ({state.skipped_steps} skipped so far)"
        )
        if cfg.on_nonfinite == "stop" or state.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
            self.checkpoint(fault=True)  # pushes no good checkpoint out (resume.rotate)
            raise TrainingFailed(
                f"non-finite loss or gradient norm at step {state.step} "
                f"({state.nonfinite_in_a_row} in a row, train.on_nonfinite="
                f"{cfg.on_nonfinite}); checkpoint saved"
            )

    # --- log: one all-reduce and one host sync every log.every_steps steps
    def log_if_due(self) -> None:
        step = self.state.step
        if step % self.run.cfg.log.every_steps and step != self.run.total_steps:
            return
        now = self.log.elapsed()
        record = log_record(self.run, step, self.since_log, now - self.state.logged_at_s)
        record["skipped_steps"] = self.state.skipped_steps
        self.state.train_loss = record["loss"]
        self.log.write({**record, "elapsed_s": round(now, 3)})
        self.log.show(step, record["loss"], record["lr"], record["tokens_per_s"])
        self.since_log.zero_()
        self.state.logged_at_s = now

    # --- evaluate and keep the best model
    def evaluate_if_due(self) -> bool:
        """Evaluate every eval.every_steps steps; True when early stopping says stop."""
        every = self.run.cfg.eval.every_steps
        if self.run.validation_set is None or not every or self.state.step % every:
            return False
        return self.evaluate_and_keep_best()

    def end_of_epoch(self) -> bool:
        """At an epoch's end, the next epoch starts; with eval.every_steps 0 it is when
        evaluation happens. True when early stopping says stop."""
        state = self.state
        if state.step_in_epoch < self.run.plan.steps_per_epoch:
            return False
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        due = not self.run.cfg.eval.every_steps and state.evaluated_at != state.step
        return due and self.run.validation_set is not None and self.evaluate_and_keep_best()

    def evaluate_and_keep_best(self) -> bool:
        """Evaluate, save the model when it is the best; True when early stopping says stop."""
        run, state = self.run, self.state
        state.evaluated_at = state.step
        started = time.monotonic()
        with self.log.paused():
            results = evaluate(
                run.model,
                run.validation_set,
                run.collator,
                run.spec,
                run.spec.make_metrics(run.label_names, run.cfg.data),
                run.accelerator,
                run.cfg.eval.batch_size,
                run.cfg.train.seed,
                run.objective,
            )
            if self.prompts:  # eval.generate: answered, kept in samples.jsonl, scored
                results |= record_samples(run, self.prompts, state.step)
            scalars = {f"eval_{k}": v for k, v in results.items() if isinstance(v, float)}
            self.log.write({"step": state.step, **scalars})
            if self.best.update(results, state.step, run.cfg.eval.early_stopping_min_delta):
                save_model(run.accelerator, run.model, run.tokenizer, run.run_dir / "best", run.cfg)
        budget = self.stop_flag.budget
        budget.eval_s = max(budget.eval_s, time.monotonic() - started)
        return self.stops_early()

    def stops_early(self) -> bool:
        """eval.early_stopping_patience evaluations without a gain, and at least
        eval.early_stopping_min_share of the planned steps done: patience counted in
        evaluations alone lets a noisy metric end a run in its first epoch when evaluations
        are frequent (measured on IMDB-sized data: stopped at step 130 of 250, 4.6 points of
        accuracy lost)."""
        cfg, step = self.run.cfg.eval, self.state.step
        if not cfg.early_stopping_patience or self.best.stale < cfg.early_stopping_patience:
            return False
        if step < cfg.early_stopping_min_share * self.run.total_steps:
            return False
        self.log.note(
            f"early stopping at step {step}: {self.best.stale} evaluation(s) without a gain "
            f"above {cfg.early_stopping_min_delta:g} in {self.best.metric}; the best is step "
            f"{self.best.step}"
        )
        return True

    # --- checkpoint on schedule, on request, and before stopping
    def checkpoint_if_due(self, requests: Requests) -> None:
        every = self.run.cfg.checkpoint.every_steps
        if (every and self.state.step % every == 0) or requests.save or requests.stop:
            with self.log.paused():
                self.checkpoint()
            self.last_save = time.monotonic()

    def checkpoint_at_epoch_end(self, done: bool) -> None:
        """checkpoint.at_epoch_end: a checkpoint once an epoch is over (after its evaluation,
        so the best model is in it), unless the step's own checkpoint was just saved or the
        run is finishing (final/ follows)."""
        if not self.run.cfg.checkpoint.at_epoch_end or done or self.state.step_in_epoch:
            return
        if self.saved_step != self.state.step:
            with self.log.paused():
                self.checkpoint()
            self.last_save = time.monotonic()

    def checkpoint(self, fault: bool = False) -> None:
        """Save a checkpoint of this step, then drop the ones beyond checkpoint.keep_last.
        `fault`: saved at a stop for non-finite values, marked so that it never rotates
        the last good checkpoints out."""
        run, state, budget = self.run, self.state, self.stop_flag.budget
        state.best = dataclasses.asdict(self.best)
        state.elapsed_s, state.save_s = self.log.elapsed(), budget.save_s
        started = time.monotonic()
        folder = checkpoint_dir(run.run_dir, state.step)
        loop = {"loop": dataclasses.asdict(state), "config": to_dict(run.cfg)}
        if fault:
            loop["fault"] = True
        mine = {"since_log": self.since_log.tolist()}
        if run.stream is not None:
            mine["stream"] = run.stream.state_dict()  # exact: taken after the step's last batch
        # a refused write raises TrainingFailed
        save_checkpoint(run.accelerator, folder, run.scheduler, loop, mine, run)
        self.saved_step = state.step
        budget.save_s = max(budget.save_s, time.monotonic() - started)
        if run.accelerator.is_main_process:
            keep = {checkpoint_dir(run.run_dir, self.best.step).resolve()}
            for old in rotate(run.run_dir, run.cfg.checkpoint.keep_last, keep):
                shutil.rmtree(old, ignore_errors=True)


def _stop_if_asked_during_set_up(run: Run, flag: StopFlag, step: int) -> None:
    """A signal during set-up (tokenizing, loading the model, hashing and loading the
    checkpoint) stops the run before its first step, with nothing new to save. One
    all-reduce, so that every process stops when any one was signalled. A time budget
    spent already is an error: a restart would spend it the same way, again and again."""
    accelerator = run.accelerator
    asked = flag.requested()
    out_of_time = asked and flag.reason == "train.max_time"
    mine = [float(asked and not out_of_time), float(out_of_time)]
    flags = torch.tensor(mine, device=accelerator.device)
    signalled, timed_out = (accelerator.reduce(flags, "sum") > 0).tolist()
    if signalled:
        reason = flag.reason if mine[0] else "a signal on another process"
        _stop_preempted(run, reason, f"before step {step + 1} (nothing new saved)")
    if timed_out:
        budget = flag.budget
        raise UserError(
            f"train.max_time: {run.cfg.train.max_time} ({budget.seconds:.0f} s) "
            f"is spent before the first step: the set-up took {budget.used_s():.1f} s "
            f"and the stop keeps {budget.margin_s():.1f} s for a step and a save; raise it"
        )


def restored_sums(run: Run, saved: list[list[float]]) -> StepSums:
    """The checkpoint's unlogged sums, one list per saving process. On as many processes,
    each takes its own (the continuation is bitwise the same). On another count, process 0
    takes them all and the others none: the next log line all-reduces them to the same
    totals. The gradient norms are the same on every process, so each takes process 0's."""
    accelerator, heads, logged = run.accelerator, len(run.spec.extra_heads), len(run.spec.logged)
    device = accelerator.device
    if len(saved) == accelerator.num_processes:
        return StepSums.from_list(saved[accelerator.process_index], device, logged)
    sums = StepSums.zeros(heads, device, logged)
    if accelerator.is_main_process:
        for values in saved:
            sums += StepSums.from_list(values, device, logged)
    sums.grad_norm = StepSums.from_list(saved[0], device, logged).grad_norm
    return sums


def log_record(run: Run, step: int, since_log: StepSums, seconds: float) -> dict:
    """One metrics.jsonl record from the sums since the last log (one all-reduce). With
    extra heads, `loss` is the objective (the sum of the parts), each part logged too; an
    objective's logged values (preference rewards) are means per target."""
    total = since_log.reduced(run.accelerator)
    steps = step % run.cfg.log.every_steps or run.cfg.log.every_steps
    tokens, positions = total.tokens.item(), total.positions.item()
    record = {
        "step": step,
        # a stream has no epochs: its passes over each source are per process
        "epoch": round(step / run.plan.steps_per_epoch, 4) if run.stream is None else None,
        **_losses(run.spec, total),
        **_logged_means(run.spec, total),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": total.grad_norm.item() / steps,
        "tokens": int(tokens),  # real (non-padding) tokens trained since the last log
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "pad_fraction": 1 - tokens / positions if positions > 0 else 0.0,
        # the loss's targets (sft: answer tokens; classification: examples; preference: pairs)
        "targets": total.targets.item(),
        "targets_per_s": total.targets.item() / max(seconds, 1e-9),
    }
    if run.accelerator.device.type == "cuda":  # this process's peak since the start
        record["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def _losses(spec: TaskSpec, total: StepSums) -> dict[str, float]:
    """`loss`: the task's mean, or with extra heads the sum of the means, each also logged
    by name (mlm_loss, nsp_loss). No targets means every step since the last log was
    skipped as non-finite: NaN."""
    pairs = [(total.loss, total.targets), *zip(total.head_loss, total.head_targets, strict=True)]
    means = [(s / n).item() if n > 0 else math.nan for s, n in pairs]
    if not spec.extra_heads:
        return {"loss": means[0]}
    names = [spec.own_loss_name, *(head.name for head in spec.extra_heads)]
    return {"loss": sum(means), **{f"{n}_loss": m for n, m in zip(names, means, strict=True)}}


def _logged_means(spec: TaskSpec, total: StepSums) -> dict[str, float]:
    """The spec's logged values as means over the targets (pairs); NaN without any."""
    targets = total.targets.item()
    values = (total.logged / targets).tolist() if targets > 0 else [math.nan] * len(spec.logged)
    return dict(zip(spec.logged, values, strict=True))


def _stop_preempted(run: Run, reason: str, where: str = "at a saved checkpoint") -> None:
    """After the checkpoint: stop with EXIT_PREEMPTED. Requeueing is the launcher's business
    (launch/requeue.py): the same words fit a laptop, a container and a cluster job."""
    run.accelerator.end_training()
    raise Preempted(f"stopped by {reason} {where}; run the same command to resume")


def _finish(run: Run, best: Best, state: LoopState) -> dict:
    """final/: the best model by eval.metric (the last one without validation, or when no
    evaluation gave a finite metric), with its model card. One commit: eval_results.json
    is written first, the card (built from it) goes into the folder, and final/ appears
    last, by one rename, so a run with final/ always has its results and its card; after a
    kill before the rename, the restart writes the card and renames (setup._complete_finish)."""
    accelerator = run.accelerator
    from_best = run.validation_set is not None and best.results is not None
    if from_best:
        results = {**best.results, "best_step": best.step, "metric": best.metric}
    else:
        results = {"train_loss": state.train_loss}
        if run.validation_set is not None:
            results |= {"best_step": None, "metric": best.metric}
    results |= {"steps": state.step, "skipped_steps": state.skipped_steps}
    if accelerator.is_main_process:
        with atomic.stop_on_failed_write(run.run_dir / "eval_results.json"):
            atomic.write_json(run.run_dir / "eval_results.json", finite(results), indent=2)
    card = finished_run_card(run.run_dir) if accelerator.is_main_process else None
    if not from_best:
        final = run.run_dir / "final"
        save_model(accelerator, run.model, run.tokenizer, final, run.cfg, card=card)
    elif accelerator.is_main_process:
        with atomic.stop_on_failed_write(run.run_dir / "best" / CARD_NAME):
            write_card(run.run_dir / "best", card)
        promote_best(run.run_dir)
    accelerator.wait_for_everyone()
    return results
