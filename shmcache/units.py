"""Byte sizes as people write them: ``256MiB``, ``1MiB``, ``64KiB``, ``4096``."""

import re

from .errors import InvalidArgument

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1 << 20,
    "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1 << 30,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text) -> int:
    """Return a byte count for an int or a string such as ``"256MiB"``; InvalidArgument (a
    ValueError) otherwise."""
    if isinstance(text, bool):
        raise InvalidArgument(f"not a byte size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"byte size must not be negative: {text}")
        return text
    match = _SIZE.fullmatch(str(text))
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise InvalidArgument(f"not a byte size: {text!r} (examples: 4096, 64KiB, 256MiB, 1GiB)")
    return int(float(match.group(1)) * unit)


def format_size(count: int) -> str:
    """``1048576`` -> ``"1.0 MiB"``: for messages and tables."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
