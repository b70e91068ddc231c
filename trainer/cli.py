"""The `trainer` command: train, evaluate, keys.

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

from trainer.config import all_keys, load_config
from trainer.errors import EXIT_USER_ERROR, UserError


def _quiet_libraries() -> None:
    """Keep the console for our own progress bar and results."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
    shown = ("accuracy", "f1", "precision", "recall", "perplexity", "loss")
    lines += [f"{k:>12}: {results[k]:.4f}" for k in shown if isinstance(results.get(k), float)]
    lines.append(json.dumps(results))
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    from trainer.train import RunFinished, train

    try:
        results = train(cfg)
    except RunFinished as done:
        print(done)
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_results(results))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from trainer.score import score

    results = score(args.model_dir, args.data, args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_results(results))
    return 0


def _keys(args: argparse.Namespace) -> int:
    for key, field in all_keys().items():
        default = field.default if field.default is not MISSING else field.default_factory()
        print(f"{key:30} {json.dumps(default):14} {field.metadata['help']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Sub-commands and their arguments."""
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from a run config")
    train.add_argument("config", help="run config YAML")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-5")
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("evaluate", help="score a model folder on a data file")
    evaluate.add_argument("model_dir", help="a run's final/ or any Hugging Face model folder")
    evaluate.add_argument("--data", required=True, help="data file to score on")
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task=mlm")
    evaluate.set_defaults(run=_evaluate)
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
        return args.run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
