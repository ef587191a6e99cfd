"""Text vggkit did not write (class names, file names, paths) made harmless where it is shown.

- On a console (printable): a terminal acts on escape sequences and control characters, so a class
  or file name holding them could move the cursor, recolour or rewrite what was printed, retitle the
  window or hide a line; each such character is shown as a Python-style escape (\\x1b, \\u202e).
- In a CSV file (csv_cell): a spreadsheet runs a cell beginning with =, +, - or @ as a formula (a
  class named =HYPERLINK(...), a file named =cmd|calc!A0.png), and some also one beginning with a
  tab or a carriage return; such a cell gets a leading ' (OWASP's advice on CSV injection), which
  the spreadsheet shows as text. A number (-0.5, +3e2) stays a number.
"""
from __future__ import annotations

import re

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def printable(text: str) -> str:
    """text with every character that is not printable (str.isprintable) as an escape; the rest as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def printable_lines(text: str) -> str:
    """printable() of each line: the line breaks themselves are kept."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def csv_cell(value):
    """value as a CSV cell that a spreadsheet shows and never runs: see the module docstring."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
