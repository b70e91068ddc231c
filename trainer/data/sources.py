"""The sources of `data.train`: one path, a list of paths, or paths with mixture weights.

Apart from the config schema because it is read after validation too: setup, `trainer
prepare` and `trainer data-stats` turn the same key into the sources they read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainer.errors import UserError
from trainer.yaml_sections import yaml11_float

if TYPE_CHECKING:
    from trainer.config import DataConfig


@dataclass(frozen=True)
class Source:
    """One training source of `data.train` and its share of the mixture."""

    path: str
    weight: float = 1.0


def train_sources(data: DataConfig, errors: list[str] | None = None) -> list[Source]:
    """`data.train` as sources with weights summing to 1 (one source: weight 1).

    Accepts a single path, a list of paths (equal weights) or of `{path, weight}` mappings.
    Problems go to `errors` when given (config validation), else raise one UserError."""
    found: list[str] = []
    entries = data.train if isinstance(data.train, list) else [data.train]
    sources = []
    for number, entry in enumerate(entries):
        key = f"data.train[{number}]" if isinstance(data.train, list) else "data.train"
        if isinstance(entry, str) and entry:
            sources.append(Source(entry))
        elif isinstance(entry, dict) and set(entry) <= {"path", "weight"}:
            path, weight = entry.get("path"), yaml11_float(entry.get("weight", 1.0))
            if not isinstance(path, str) or not path:
                found.append(f"{key}.path: required (a file, glob or hub dataset)")
            elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                found.append(f"{key}.weight: must be a number > 0, got {weight!r}")
            else:
                sources.append(Source(path, float(weight)))
        elif isinstance(entry, dict):
            unknown = ", ".join(sorted(map(str, set(entry) - {"path", "weight"})))
            found.append(f"{key}: unknown key(s) {unknown} (expected path and weight)")
        elif entry is not None:
            found.append(f"{key}: expected a path or {{path: P, weight: W}}, got {entry!r}")
    if isinstance(data.train, list) and not data.train:
        found.append("data.train: an empty list; name at least one source")
    if errors is not None:
        errors += found
    elif found:
        raise UserError("; ".join(found))
    total = sum(source.weight for source in sources)
    return [Source(source.path, source.weight / total) for source in sources]
