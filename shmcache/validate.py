"""The rules for what callers name and pass: group names, keys, TTLs and value sizes.

Each rule is written here once; the modules that check (Group, Store, the HTTP front, the
clients, the index) call these. The key limit is the arena's ``MAX_KEY_BYTES`` (the
layout depends on it). This module imports only the layout's constants and the errors.
"""

import math
import re

from .errors import InvalidArgument, InvalidKey, ValueTooLarge
from .layout import MAX_KEY_BYTES

GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
GROUP_NAME_RULE = "1 to 64 of letters, digits, '_', '.', '-'"
MAX_SECONDS = 1e9           # a TTL (or stale window) must be below this


def is_group_name(name):
    """True if ``name`` is 1 to 64 of letters, digits, '_', '.', '-' (not first)."""
    return isinstance(name, str) and GROUP_NAME.fullmatch(name) is not None


def is_seconds(value, zero=False):
    """True if ``value`` is a number (not a bool) of seconds above zero (or zero, with
    ``zero``) and below MAX_SECONDS: what a TTL, a not-found TTL or a stale window is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (0 <= value if zero else 0 < value) and value < MAX_SECONDS


def check_ttl(ttl, what="ttl"):
    """None, or a positive number of seconds; InvalidArgument (a ValueError, naming
    ``what``) otherwise."""
    if ttl is None:
        return None
    if not is_seconds(ttl):
        raise InvalidArgument(f"{what} must be a positive number of seconds or None, "
                              f"not {ttl!r}")
    return float(ttl)


def positive_ttl(ttl):
    """``ttl`` (a number, or a number's text as a query string has it) as a float if it is
    a number of seconds as ``is_seconds`` has it; ValueError (for an HTTP answer) if not."""
    try:
        ttl = float(ttl)
    except OverflowError:
        ttl = math.inf
    if not is_seconds(ttl):
        raise ValueError("ttl must be a positive number of seconds")
    return ttl


def encode_key(key, limit=MAX_KEY_BYTES):
    """Key as bytes; InvalidKey unless 1..``limit`` (at most MAX_KEY_BYTES) bytes of str
    (UTF-8) or bytes."""
    if isinstance(key, str):
        data = key.encode()
    elif isinstance(key, (bytes, bytearray, memoryview)):
        data = bytes(key)
    else:
        raise InvalidKey(f"key must be str or bytes, not {type(key).__name__}")
    if not 0 < len(data) <= limit:
        raise InvalidKey(f"key must be 1 to {limit} bytes, got {len(data)}")
    return data


def check_value_size(size, max_item_size):
    """ValueTooLarge if a value of ``size`` bytes exceeds ``max_item_size``."""
    if size > max_item_size:
        raise ValueTooLarge(f"value of {size} bytes exceeds the max item size "
                            f"of {max_item_size} bytes")


def encode_value(value):
    """A value as bytes: bytes as they are, str as UTF-8; TypeError for anything else."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"value must be bytes or str, not {type(value).__name__}")
