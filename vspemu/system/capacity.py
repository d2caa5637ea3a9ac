"""Capacity strings as the array writes and reads them ("10G", "512M", "1.00 G")."""

from __future__ import annotations

import re
from fractions import Fraction

from vspemu.errors import invalid

BLOCK = 512
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# ASCII digits only (\d alone would take any Unicode digit), at most 20 before and 20 after the point
_CAP_RE = re.compile(r"^\s*(\d{1,20}(?:\.\d{1,20})?)\s*([KMGTP]?)B?\s*$", re.IGNORECASE | re.ASCII)


def parse_byte_capacity(text: str, attribute: str = "byteFormatCapacity") -> int:
    """"10G" -> bytes (base 1024), rounded up to a whole 512-byte block; exact (no float)."""
    m = _CAP_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise invalid(attribute, text, "Specify a number followed by a unit: K, M, G, T (e.g. 10G).")
    value = Fraction(m.group(1)) * _UNITS[m.group(2).upper()]
    nbytes = -(-value // BLOCK) * BLOCK
    if nbytes <= 0:
        raise invalid(attribute, text, "The capacity must be greater than 0.")
    return int(nbytes)


def format_byte_capacity(nbytes: int) -> str:
    """Bytes -> the array's display form, e.g. 1073741824 -> "1.00 G"."""
    for unit in ("T", "G", "M", "K"):
        size = _UNITS[unit]
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"
