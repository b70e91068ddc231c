"""Reading RUN_DIR/metrics.jsonl back: one JSON record per line, appended by the main
process (run/tracking.py). A kill during an append leaves a torn last line, which is not a
record yet and is dropped; any other line that does not parse is an error naming it."""

from __future__ import annotations

import json
from pathlib import Path

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
