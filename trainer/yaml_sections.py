"""YAML mappings into nested config dataclasses: the run config (config.py) and the cluster
profiles (launch/profiles.py) are read the same way.

A missing file or bad YAML is one line naming the file (and line); `key=value` overrides
go onto the mapping before it is checked; and building a dataclass collects every unknown
key (with the closest valid one) and every wrong type instead of stopping at the first.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import UserError
from trainer.text_files import read_text

UNIONS = (typing.Union, types.UnionType)  # `Optional[float]` and `float | None`


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of a (nested) config dataclass, sections included, as dotted names."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            keys += dotted_keys(hint, f"{prefix}{name}.")
    return keys


def _closest(name: str, root: type) -> str:
    matches = difflib.get_close_matches(name, dotted_keys(root), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning a missing file or bad YAML into a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a directory; name the YAML file in it")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = read_text(path, f"config file {path}")  # UTF-8, a BOM dropped, else one line
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path}{_yaml_problem(err, text)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: must be a mapping of keys to values")
    return data


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """Where and why PyYAML stopped, in the user's terms: ` line N column C: not valid
    YAML (PyYAML's reason; a hint for the usual two causes)`."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or "not valid YAML"
    if mark is None:
        return f": not valid YAML ({problem})"
    line = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
    if "\t" in line[: mark.column + 1] or "'\\t'" in problem:
        hint = "; YAML indents with spaces, not tabs"
    elif "mapping values are not allowed" in problem or "expected <block end>" in problem:
        hint = "; check the indentation of this line and the one above"
    else:
        hint = ""
    where = f" line {mark.line + 1} column {mark.column + 1}"
    return f"{where}: not valid YAML ({problem}{hint}): {line.strip()!r}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides (values parsed as YAML) onto a nested dict copy."""
    merged = yaml.safe_load(yaml.safe_dump(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}': expected key=value, e.g. train.lr=3e-5")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return merged


# --- building dataclasses ----------------------------------------------------------------


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in UNIONS:
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


def _type_name(annotation: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    names |= {dict: "a mapping", list: "a list", type(None): "null"}
    args = typing.get_args(annotation) or (annotation,)
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)


def yaml11_float(value: Any) -> Any:
    """PyYAML reads `1e-3` (no dot) as a string; accept it where a number is expected."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _integral(value: Any) -> Any:
    """A whole number written as a float (`3.0`) or in e-notation, which YAML 1.1 reads as a
    string (`1e3`), as the integer it is; anything else unchanged (and refused if not an int)."""
    number = yaml11_float(value)
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return value


def _number_type(annotation: Any) -> type | None:
    """float or int for a field that takes that number, alone or with null (`head_lr: float |
    None`, whose `1e-3` YAML 1.1 reads as a string as much as `lr`'s); None for any other."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in UNIONS else ()
    kinds = [a for a in args if a is not type(None)] or [annotation]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (float, int) else None


def build_section(
    cls: type, values: Any, prefix: str, errors: list[str], root: type | None = None
) -> Any:
    """Build the dataclass `cls` (nested ones too) from a mapping, appending every unknown
    key and wrong type to `errors` (with the closest valid key) instead of stopping."""
    root = root or cls
    if not isinstance(values, dict):
        errors.append(f"{prefix}: must be a mapping of keys to values")
        return cls()
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            errors.append(f"unknown key '{dotted}'{_closest(dotted, root)}")
            continue
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build_section(hints[key], value, dotted, errors, root)
            continue
        number = _number_type(hints[key])
        if number is float:
            value = yaml11_float(value)
        elif number is int:
            value = _integral(value)
        if key == "precision" and value is False:
            value = "no"  # YAML 1.1 reads a bare `no` as false
        if not _type_ok(value, hints[key]):
            errors.append(f"{dotted}: expected {_type_name(hints[key])}, got {value!r}")
        elif number is float and value is not None and not math.isfinite(value):  # `inf`, 1e400
            errors.append(f"{dotted}: expected a finite number, got {value!r}")
        else:
            kwargs[key] = float(value) if number is float and value is not None else value
    return cls(**kwargs)
