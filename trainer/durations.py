"""Durations as SLURM writes them (`--time`), for `train.max_time`: the same text means the
same time in a run config and in the job script that runs it."""

from __future__ import annotations


def parse_duration(text: str | int) -> float | None:
    """Seconds in SLURM's --time format, read as SLURM reads it: MM, MM:SS, HH:MM:SS, D-HH,
    D-HH:MM or D-HH:MM:SS (a bare number is minutes, "1-12" is a day and 12 hours). None
    for anything else, and for a total of zero (SLURM's "no limit": leave the key unset)."""
    text = str(text).strip()
    days, _, clock = text.partition("-") if "-" in text else ("0", "", text)
    parts = clock.split(":")
    if not days.isdigit() or len(parts) > 3 or not all(p.isdigit() for p in parts):
        return None
    # after "D-" the hours come first; without days, minutes first unless all three are there
    units = (3600, 60, 1) if "-" in text or len(parts) == 3 else (60, 1)
    if len(parts) > len(units):
        return None
    total = int(days) * 86400 + sum(int(v) * u for v, u in zip(parts, units, strict=False))
    return total or None
