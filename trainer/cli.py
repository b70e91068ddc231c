"""The `trainer` command: train, prepare and inspect data, evaluate, predict, export, report.

Config problems are found before torch or transformers are imported, so `trainer train`
with a typo answers at once. Whatever the user can fix ends as one line on stderr and exit
code 2; a finished run started again says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING

from launch.cli import add_commands as add_launch_commands
from launch.guard import check_train_environment
from launch.restarts import checked_start
from trainer.config import all_keys, load_config
from trainer.errors import EXIT_TRAINING_FAILED, EXIT_USER_ERROR, UserError
from trainer.run.stop import EXIT_INTERRUPTED, StopFlag
from trainer.security import no_world_write

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def _quiet_libraries() -> None:
    """Keep the console for our own progress bar and results.

    TOKENIZERS_PARALLELISM is left as the user set it (unset: the fast tokenizers use every
    core). It only has to be false in a process that forks after tokenizing, and nothing
    here does: the DataLoader has no workers, `datasets.map` runs in-process (no num_proc),
    and subprocesses (launch, scontrol) start through vfork/exec, which runs no fork
    handlers. Whoever adds workers or num_proc sets it there, next to the fork."""
    import torch

    if not torch.cuda.is_available():  # DeepSpeed otherwise warns that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


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
    from trainer.commands.report import make_report

    print(make_report(args.run_dir, args.out))
    return 0


def _add_predict_parser(commands) -> None:
    predict = commands.add_parser("predict", help="predict on new texts with a model folder")
    predict.add_argument("model_dir", help="a run's final/ (full or adapter) or a model folder")
    predict.add_argument(
        "--input",
        required=True,
        help="csv, tsv, jsonl, json or parquet (data.text_column, and `id` if present), "
        "or txt (one text per non-blank line, its line number as id)",
    )
    predict.add_argument(
        "--output", required=True, help="jsonl file, one row per input: id, text, prediction"
    )
    predict.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass")
    predict.add_argument(
        "--precision", choices=("no", "bf16", "fp16"), default="no", help="fp16: CUDA only"
    )
    predict.add_argument(
        "--quantize", default="no", help="int8: dynamic int8 Linear layers (CPU, fp32 only)"
    )
    predict.add_argument(
        "--pad-to-multiple-of",
        type=int,
        metavar="N",
        help="round each batch's length up to a multiple of N (default: 8 on CUDA, 1 on CPU)",
    )
    predict.add_argument("--top-k", type=int, default=5, help="mlm: fills per mask token")
    predict.add_argument("--max-new-tokens", type=int, default=32, help="clm: tokens to add")
    predict.add_argument("--temperature", type=float, default=0.0, help="clm: 0 is greedy")
    predict.add_argument("--top-p", type=float, default=1.0, help="clm: nucleus sampling")
    predict.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another LoRA adapter on the same base (repeatable)",
    )
    predict.add_argument("--use", metavar="NAME", help="the adapter that serves this run")
    predict.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task=mlm")
    predict.set_defaults(run=_predict)


def _tokenizer(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from trainer.commands.tokenizer import extend_command, train_command

    if args.action == "train":
        train_command(args.corpus, args.type, args.vocab_size, args.out, args.reference)
    else:
        extend_command(args.base, args.corpus, args.add, args.out, args.min_frequency)
    return 0


def _add_tokenizer_parser(commands) -> None:
    tokenizer = commands.add_parser("tokenizer", help="train a tokenizer or extend one")
    actions = tokenizer.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a new tokenizer on a corpus")
    train.add_argument("corpus", nargs="+", help="text files or globs, or a run config YAML")
    train.add_argument("--type", required=True, help="wordpiece | bpe | unigram")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary")
    train.add_argument("--out", required=True, help="folder to write (new or empty)")
    train.add_argument("--reference", help="tokenizer to compare with (default: the config's)")
    extend = actions.add_parser("extend", help="add frequent domain words to a tokenizer")
    extend.add_argument("base", help="the tokenizer (or model) folder or hub id to extend")
    extend.add_argument("--corpus", nargs="+", required=True, help="text files or globs")
    extend.add_argument("--add", type=int, required=True, help="how many words to add")
    extend.add_argument("--out", required=True, help="folder to write (new or empty)")
    extend.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences")
    tokenizer.set_defaults(run=_tokenizer)


def _keys(args: argparse.Namespace) -> int:
    for key, field in all_keys().items():
        default = field.default if field.default is not MISSING else field.default_factory()
        print(f"{key:34} {json.dumps(default):14} {field.metadata['help']}")
    return 0


def _add_config_command(commands, name: str, help: str, run) -> argparse.ArgumentParser:
    """A sub-command that takes a run config and key=value overrides."""
    command = commands.add_parser(name, help=help)
    command.add_argument("config", help="run config YAML")
    command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-5")
    command.set_defaults(run=run)
    return command


def build_parser() -> argparse.ArgumentParser:
    """Sub-commands and their arguments."""
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_config_command(commands, "train", "train a model from a run config", _train)
    _add_config_command(commands, "prepare", "tokenize a run's data into data.cache_dir", _prepare)
    evaluate = commands.add_parser("evaluate", help="score a model folder on a data file")
    evaluate.add_argument("model_dir", help="a run's final/ or any Hugging Face model folder")
    evaluate.add_argument("--data", required=True, help="data file to score on")
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task=mlm")
    evaluate.set_defaults(run=_evaluate)
    _add_predict_parser(commands)
    stats = _add_config_command(
        commands, "data-stats", "lengths, labels, duplicates of a run's data", _data_stats
    )
    stats.add_argument(
        "--json", help="report file (default: data-stats.json in the config's output_dir)"
    )
    export = commands.add_parser(
        "export", help="export a run's model with its card: adapter, merged or full; or push it"
    )
    export.add_argument("run_dir", help="a run directory or its final/ folder")
    export.add_argument("--out", help="folder to write (must not exist, or be empty)")
    export.add_argument("--merge", action="store_true", help="merge into a standalone model")
    export.add_argument(
        "--checkpoint", help="export checkpoints/step-N of RUN_DIR (step-N or N), even mid-run"
    )
    export.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="upload the export to this Hub model repo (created if need be; needs a token)",
    )
    export.add_argument("--private", action="store_true", help="a new repo is private")
    export.set_defaults(run=_export)
    report = commands.add_parser("report", help="plots and report.md of a run directory")
    report.add_argument("run_dir", help="a run directory (finished or still training)")
    report.add_argument("--out", help="folder for the report (default: RUN_DIR/report)")
    report.set_defaults(run=_report)
    add_launch_commands(commands)
    _add_tokenizer_parser(commands)
    keys = commands.add_parser("keys", help="list every run config key with its meaning")
    keys.set_defaults(run=_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trainer` console script and `python -m trainer`."""
    parser = build_parser()
    # Overrides may come after options (`evaluate DIR --data F task=mlm`): collect them.
    args, extra = parser.parse_known_args(argv)
    strays = [item for item in extra if item.startswith("-") or "=" not in item]
    if strays or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(strays or extra)}")
    if extra:
        args.overrides += extra
    try:
        with no_world_write():
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
