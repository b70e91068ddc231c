"""The JSON records a run writes (metrics.jsonl, eval_results.json) and reading them back.

metrics.jsonl holds one JSON record per line, appended by the main process (run/tracking.py).
A kill during an append leaves a torn last line, which is not a record yet and is dropped;
any other line that does not parse is an error naming it. Non-finite numbers are written as
null: JSON has no NaN, and Python's `NaN` token is not JSON to any other reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainer.errors import UserError


def read_records(path: Path) -> list[dict]:
    """Every complete record, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path} line {number}: not a JSON object") from None
        if not isinstance(record, dict) or "step" not in record:
            raise UserError(f"{path} line {number}: not a record with a step")
        records.append(record)
    return records


def finite(value: Any) -> Any:
    """`value` with every non-finite float, however deeply nested, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
