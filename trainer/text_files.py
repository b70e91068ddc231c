"""Reading the user's text files (run configs, csv, jsonl, txt, CoNLL) as UTF-8, one way.

Editors on Windows save UTF-8 with a byte-order mark, and spreadsheets export UTF-16 or
Latin-1: read as is, a BOM becomes part of the first csv header (`\\ufefftext`, so the text
column is "missing") and other encodings fail with a UnicodeDecodeError deep in a reader.
Here a UTF-8 BOM is dropped, a UTF-16/32 file is refused for what it is, and a byte that is
not UTF-8 is reported as one line naming the file and the line it is on.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

from trainer.errors import UserError

WIDE_BOMS = {  # longest first: the UTF-32-LE mark starts with the UTF-16-LE one
    codecs.BOM_UTF32_LE: "UTF-32",
    codecs.BOM_UTF32_BE: "UTF-32",
    codecs.BOM_UTF16_LE: "UTF-16",
    codecs.BOM_UTF16_BE: "UTF-16",
}
SAVE_AS_UTF8 = "save it as UTF-8"


def strip_bom(label: str, head: bytes) -> bytes:
    """`head` (the first line's bytes) without a UTF-8 BOM; a UTF-16/32 BOM is refused."""
    for mark, name in WIDE_BOMS.items():
        if head.startswith(mark):
            raise UserError(f"{label}: {name} text (byte-order mark); {SAVE_AS_UTF8}")
    return head.removeprefix(codecs.BOM_UTF8)


def _decode(label: str, raw: bytes, line: int) -> str:
    """One line's bytes as text, or a UserError naming the line and the first bad byte."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad, column = raw[err.start], raw[: err.start].decode("utf-8", "replace")
        raise UserError(
            f"{label} line {line}: not UTF-8 text (byte 0x{bad:02x} after "
            f"{len(column)} characters); {SAVE_AS_UTF8}"
        ) from None
    if "\x00" in text:  # UTF-16 without a byte-order mark decodes as UTF-8 with NULs
        raise UserError(f"{label} line {line}: holds NUL bytes (UTF-16?); {SAVE_AS_UTF8}")
    return text


def decoded_lines(path: Path, label: str | None = None) -> Iterator[str]:
    """The lines of a text file (line ends kept, as `open()` yields them), checked as UTF-8
    one by one, so that a bad byte names its line however far into the file it is.
    Messages start with `label` (default: the file's name)."""
    label = label or path.name
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield _decode(label, strip_bom(label, raw) if number == 1 else raw, number)


def read_text(path: Path, label: str | None = None) -> str:
    """A whole text file, checked as `decoded_lines` checks it."""
    return "".join(decoded_lines(path, label))
