"""The `trainer` command line: global options, sub-commands, their arguments, help and
examples. Each command runs a function of trainer/cli.py (`runners`, by command name); plan,
launch and submit come from launch/cli.py."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version

from launch.cli import add_commands as add_launch_commands
from trainer.cli_help import HelpfulParser, examples
from trainer.progress import PROGRESS_ENV

DISTRIBUTION = "steadytrain"  # the name pip installs this project under
DESCRIPTION = (
    "The `trainer` command: train, prepare and inspect data, evaluate, predict, export, report."
)
Runner = Callable[[argparse.Namespace], int]
Runners = Mapping[str, Runner]


def _add_predict_parser(commands, runners: Runners) -> None:
    predict = commands.add_parser(
        "predict",
        help="predict on new texts with a model folder",
        epilog=examples(
            "trainer predict runs/sentiment/final --input reviews.csv --output predictions.jsonl",
            "trainer predict bert/ --input masked.txt --output fills.jsonl task=mlm --top-k 3",
        ),
    )
    predict.add_argument("model_dir", help="a run's final/ (full or adapter) or a model folder")
    predict.add_argument(
        "--input",
        required=True,
        help="csv, tsv, jsonl, json (a list of objects or JSON lines) or parquet: their "
        "data.text_column (sft: or a `messages` list ending with the user's turn), and `id` "
        "if present; txt: one text per non-blank line, its line number as id",
    )
    predict.add_argument(
        "--output", required=True, help="jsonl file, one row per input: id, text, prediction"
    )
    predict.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass")
    predict.add_argument(
        "--precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="autocast dtype of the forward passes (no: the weights' own dtype; fp16: CUDA)",
    )
    predict.add_argument(
        "--quantize",
        default="no",
        help="int8: dynamic int8 Linear layers (CPU, fp32 only; never the default)",
    )
    predict.add_argument(
        "--pad-to-multiple-of",
        type=int,
        metavar="N",
        help="round each batch's length up to a multiple of N (unset: 8 on CUDA, 1 on CPU)",
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
    predict.set_defaults(run=runners["predict"])


def _add_tokenizer_parser(commands, runners: Runners) -> None:
    train_example = (
        "trainer tokenizer train docs/*.txt --type wordpiece --vocab-size 8000 --out tok"
    )
    extend_example = (
        "trainer tokenizer extend bert-base-uncased --corpus notes.txt --add 500 --out tok"
    )
    tokenizer = commands.add_parser(
        "tokenizer",
        help="train a tokenizer or extend one",
        epilog=examples(train_example, extend_example),
    )
    actions = tokenizer.add_subparsers(dest="action", required=True, help="what to do")
    train = actions.add_parser(
        "train",
        help="train a new tokenizer on a corpus",
        epilog=examples(
            train_example,
            "trainer tokenizer train configs/bert-from-scratch-pretraining.yaml --type unigram "
            "--vocab-size 8000 --out tok",
        ),
    )
    train.add_argument("corpus", nargs="+", help="text files or globs, or a run config YAML")
    train.add_argument("--type", required=True, help="wordpiece | bpe | unigram")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary")
    train.add_argument("--out", required=True, help="folder to write (new or empty)")
    train.add_argument("--reference", help="tokenizer to compare with (default: the config's)")
    extend = actions.add_parser(
        "extend", help="add frequent domain words to a tokenizer", epilog=examples(extend_example)
    )
    extend.add_argument("base", help="the tokenizer (or model) folder or hub id to extend")
    extend.add_argument("--corpus", nargs="+", required=True, help="text files or globs")
    extend.add_argument("--add", type=int, required=True, help="how many words to add")
    extend.add_argument("--out", required=True, help="folder to write (new or empty)")
    extend.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences")
    tokenizer.set_defaults(run=runners["tokenizer"])


def _add_config_command(
    commands, name: str, help: str, run: Runner, *example: str
) -> argparse.ArgumentParser:
    """A sub-command that takes a run config and key=value overrides."""
    command = commands.add_parser(name, help=help, epilog=examples(*example))
    command.add_argument("config", help="run config YAML")
    command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-5")
    command.set_defaults(run=run)
    return command


def _add_run_commands(commands, runners: Runners) -> None:
    """The commands that read a run config: train, prepare, data-stats."""
    quickstart = "configs/quickstart-sentiment-minilm.yaml"
    _add_config_command(
        commands,
        "train",
        "train a model from a run config",
        runners["train"],
        f"trainer train {quickstart}",
        f"trainer --quiet train {quickstart} train.lr=3e-5 output_dir=runs/lr3e-5",
    )
    _add_config_command(
        commands,
        "prepare",
        "tokenize a run's data into data.cache_dir",
        runners["prepare"],
        "trainer prepare configs/mlm-domain-adaptive-pretraining.yaml",
    )
    stats = _add_config_command(
        commands,
        "data-stats",
        "lengths, labels, duplicates of a run's data",
        runners["data-stats"],
        f"trainer data-stats {quickstart}",
        f"trainer data-stats {quickstart} data.max_length=128 --json stats.json",
    )
    stats.add_argument(
        "--json", help="report file (default: data-stats.json in the config's output_dir)"
    )


def _add_model_commands(commands, runners: Runners) -> None:
    """The commands that read a model or run folder: evaluate, export, report."""
    evaluate = commands.add_parser(
        "evaluate",
        help="score a model folder on a data file",
        epilog=examples(
            "trainer evaluate runs/sentiment/final --data data/sentiment_validation.csv",
            "trainer evaluate bert-folder --data text_validation.txt task=mlm",
        ),
    )
    evaluate.add_argument("model_dir", help="a run's final/ or any Hugging Face model folder")
    evaluate.add_argument("--data", required=True, help="data file to score on")
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task=mlm")
    evaluate.set_defaults(run=runners["evaluate"])
    export = commands.add_parser(
        "export",
        help="export a run's model with its card: adapter, merged or full; or push it",
        epilog=examples(
            "trainer export runs/sentiment-lora --out exported/adapter",
            "trainer export runs/sentiment-lora --out exported/merged --merge --checkpoint 500",
            "trainer export runs/sentiment-lora --push-to-hub me/sentiment-lora --private",
        ),
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
    export.set_defaults(run=runners["export"])
    report = commands.add_parser(
        "report",
        help="plots and report.md of a run directory",
        epilog=examples("trainer report runs/quickstart-sentiment --out /tmp/sentiment-report"),
    )
    report.add_argument("run_dir", help="a run directory (finished or still training)")
    report.add_argument("--out", help="folder for the report (default: RUN_DIR/report)")
    report.set_defaults(run=runners["report"])


def _installed_version() -> str:
    """The version pip installed (the distribution's metadata); a checkout that was never
    installed has none, and says the package's own."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        from trainer import __version__

        return f"{__version__} (not installed)"


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    """Options of `trainer` itself, given before the command: `trainer --quiet train ...`."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and errors on stderr"
    )
    loudness.add_argument(
        "-v", "--verbose", action="store_true", help="debug messages too (and library warnings)"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help=f"no progress bars (they show only when stderr is a terminal; "
        f"{PROGRESS_ENV}=1 forces them)",
    )


def build_parser(runners: Runners) -> argparse.ArgumentParser:
    """Sub-commands and their arguments; every help shows the defaults and examples."""
    parser = HelpfulParser(
        prog="trainer",
        description=DESCRIPTION,
        epilog=examples(
            "trainer train configs/quickstart-sentiment-minilm.yaml",
            "trainer COMMAND --help",
        ),
    )
    _add_global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, help="what to do")
    _add_run_commands(commands, runners)
    _add_model_commands(commands, runners)
    _add_predict_parser(commands, runners)
    add_launch_commands(commands)
    _add_tokenizer_parser(commands, runners)
    keys = commands.add_parser(
        "keys",
        help="list every run config key with its meaning",
        epilog=examples("trainer keys | grep train."),
    )
    keys.set_defaults(run=runners["keys"])
    return parser
