"""The `trainer` command: train, prepare and inspect data, evaluate, predict, export, report.

Config problems are found before torch or transformers are imported, so `trainer train`
with a typo answers at once. Whatever the user can fix ends as one line on stderr and exit
code 2; a finished run started again says so and exits 0.

Results go to stdout (the last line of a command is one JSON object); notes and warnings go
through logging (trainer/logs.py) to stderr, which --quiet and --verbose filter, and the
progress bars (trainer/progress.py) to stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from launch.guard import check_train_environment
from launch.restarts import checked_start
from trainer import progress
from trainer.cli_parser import build_parser
from trainer.config import all_keys, load_config
from trainer.errors import EXIT_TRAINING_FAILED, EXIT_USER_ERROR, UserError
from trainer.logs import console, level_from
from trainer.run.stop import EXIT_INTERRUPTED, StopFlag
from trainer.security import no_world_write

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def _transformers_bar(factory: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """transformers' own bars ("Loading weights") follow our rule: main process, terminal,
    not with --no-progress (every rank would draw its own otherwise)."""
    return factory(*args, **(kwargs if progress.enabled() else {**kwargs, "disable": True}))


def _quiet_libraries() -> None:
    """Keep the console for our own progress bars, messages and results: `datasets` bars
    are off (ours replace them), transformers says only errors (--verbose: warnings too).
    The hub's download bars stay the hub's to show, unless --no-progress.

    TOKENIZERS_PARALLELISM is left as the user set it (unset: the fast tokenizers use every
    core). It only has to be false in a process that forks after tokenizing, and nothing
    here does: the DataLoader has no workers, `datasets.map` runs in-process (no num_proc),
    and subprocesses (launch, scontrol) start through vfork/exec, which runs no fork
    handlers. Whoever adds workers or num_proc sets it there, next to the fork."""
    import torch

    if not torch.cuda.is_available():  # DeepSpeed otherwise warns that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    verbose = logging.getLogger("trainer").isEnabledFor(logging.DEBUG)
    transformers.logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)
    # not transformers.logging.disable_progress_bar(): it hides the hub's download bars too
    if hasattr(transformers.logging, "set_tqdm_hook"):  # transformers 5; older ones draw theirs
        transformers.logging.set_tqdm_hook(_transformers_bar)
    if os.environ.get(progress.PROGRESS_ENV) == "0":
        huggingface_hub.utils.disable_progress_bars()


def format_results(results: dict) -> str:
    """Human-readable results (the confusion matrix as a table), then one JSON line."""
    lines = []
    if "confusion_matrix" in results:
        labels = results["labels"]
        width = max(8, *(len(str(name)) for name in labels))
        lines.append("confusion matrix (rows: true, columns: predicted)")
        lines.append(" " * width + "".join(f"{name:>{width + 1}}" for name in labels))
        for name, row in zip(labels, results["confusion_matrix"], strict=True):
            lines.append(f"{name:>{width}}" + "".join(f"{v:>{width + 1}}" for v in row))
    shown = ("accuracy", "f1", "precision", "recall", "perplexity", "nsp_accuracy", "loss")
    shown += ("exact_match", "contains")
    lines += [f"{k:>12}: {results[k]:.4f}" for k in shown if isinstance(results.get(k), float)]
    lines.append(json.dumps(results))
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    # First: a signal during everything below (imports, tokenizing, loading) must be kept.
    stop_flag = StopFlag().install()
    try:
        return _train_with(args, stop_flag)
    except KeyboardInterrupt:
        if stop_flag.interrupts < 2:  # not the second Ctrl-C (see trainer/run/stop.py)
            raise
        print("interrupted: aborted without saving (Ctrl-C twice)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        stop_flag.restore()


def _train_with(args: argparse.Namespace, stop_flag: StopFlag) -> int:
    cfg = load_config(args.config, args.overrides)
    check_train_environment(cfg)  # how it was started: SLURM tasks, accelerate launch files
    cfg = checked_start(cfg, os.environ)  # a requeued SLURM job: resume, restarts
    _quiet_libraries()
    from trainer.run.collectives import timed_out_collective
    from trainer.run.rundir import release_run_dir
    from trainer.run.setup import RunFinished
    from trainer.run.stop import EXIT_PREEMPTED, Preempted
    from trainer.run.train import TrainingFailed, train

    try:
        results = train(cfg, stop_flag)
    except RunFinished as done:
        print(done)
        return 0
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingFailed as failed:
        print(f"error: {failed}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except RuntimeError as err:
        if (line := timed_out_collective(err, cfg.train.collective_timeout)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    finally:
        release_run_dir()
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_results(results))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    from trainer.commands.prepare import prepare_command

    stats = prepare_command(cfg)
    where = stats["folder"] or "memory (data.cache_dir is null)"
    print(f"tokenized data {stats['status']} in {stats['seconds']:.1f} s: {where}")
    print(json.dumps(stats))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from trainer.commands.evaluate import score

    results = score(args.model_dir, args.data, args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_results(results))
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.private and args.push_to_hub is None:
        raise UserError("--private: makes the repo of --push-to-hub private; name one")
    if args.out is None and args.push_to_hub is None:
        raise UserError("export: name where it goes: --out DIR, --push-to-hub REPO_ID, or both")
    _quiet_libraries()
    if args.push_to_hub is None:
        from trainer.commands.export import Destination, export

        summary = export(args.run_dir, Destination.local(args.out), args.merge, args.checkpoint)
    else:
        from trainer.commands.push import export_to_hub

        where = (args.push_to_hub, args.private, args.merge, args.checkpoint, args.out)
        summary = export_to_hub(args.run_dir, *where)
    print(json.dumps(summary))
    return 0


def _predict(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from trainer.commands.predict import predict_file
    from trainer.inference import PredictOptions

    options = PredictOptions(
        batch_size=args.batch_size,
        precision=args.precision,
        quantize=args.quantize,
        pad_to_multiple_of=args.pad_to_multiple_of,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    stats = predict_file(
        args.model_dir, args.input, args.output, args.overrides, options, args.adapter, args.use
    )
    print(
        f"{stats['rows']} rows in {stats['seconds']:.2f} s "
        f"({stats['rows_per_s']:.1f} rows/s) -> {args.output}"
    )
    print(json.dumps(stats))
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    from trainer.commands.data_stats import data_stats, format_report, write_report

    report = data_stats(cfg)
    print(format_report(report))
    path = args.json or os.path.join(cfg.output_dir, "data-stats.json")  # next to the run
    print(f"wrote {write_report(report, path)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from trainer.commands.report import latest_samples, make_report, samples_section

    print(make_report(args.run_dir, args.out))
    # the latest generated answers (eval.generate) are read here too, not only in report.md
    for line in samples_section(latest_samples(Path(args.run_dir) / "samples.jsonl")):
        print(line)
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from trainer.commands.tokenizer import extend_command, train_command

    if args.action == "train":
        result, lines = train_command(
            args.corpus, args.type, args.vocab_size, args.out, args.reference
        )
    else:
        result, lines = extend_command(
            args.base, args.corpus, args.add, args.out, args.min_frequency
        )
    print("\n".join(lines))
    print(json.dumps(result))
    return 0


def _keys(args: argparse.Namespace) -> int:
    for key, field in all_keys().items():
        default = field.default if field.default is not MISSING else field.default_factory()
        print(f"{key:34} {json.dumps(default):14} {field.metadata['help']}")
    return 0


RUNNERS = {
    "train": _train,
    "prepare": _prepare,
    "data-stats": _data_stats,
    "evaluate": _evaluate,
    "export": _export,
    "report": _report,
    "predict": _predict,
    "tokenizer": _tokenizer,
    "keys": _keys,
}


@contextmanager
def _progress_setting(no_progress: bool) -> Iterator[None]:
    """--no-progress, for this command and the processes it starts; as it was afterwards."""
    before = os.environ.get(progress.PROGRESS_ENV)
    if no_progress:
        os.environ[progress.PROGRESS_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(progress.PROGRESS_ENV, None)
        else:
            os.environ[progress.PROGRESS_ENV] = before


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trainer` console script and `python -m trainer`."""
    parser = build_parser(RUNNERS)
    # Overrides may come after options (`evaluate DIR --data F task=mlm`): collect them.
    args, extra = parser.parse_known_args(argv)
    strays = [item for item in extra if item.startswith("-") or "=" not in item]
    if strays or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(strays or extra)}")
    if extra:
        args.overrides += extra
    level = level_from(args.quiet, args.verbose)
    try:
        with console(level), _progress_setting(args.no_progress), no_world_write():
            return args.run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # `trainer keys | head`: the reader left. Python's own advice: point stdout at
        # devnull so that the flush at exit does not raise again, and exit as a shell would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
