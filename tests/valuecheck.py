"""Self-checking values for concurrency tests: each names its group, key, writer and
sequence number and ends with a CRC, so a reader can tell a whole, right value from a torn
or misplaced one."""

import zlib

_PAD = bytes(range(256)) * 64


def make_value(group, key, writer, seq, length):
    """A value of about ``length`` payload bytes that identifies itself."""
    head = f"{group}|{key}|{writer}|{seq}|".encode()
    start = seq % 256
    body = head + _PAD[start:start + length]
    return body + zlib.crc32(body).to_bytes(4, "little")


def check_value(group, key, value):
    """(writer, seq) if ``value`` is whole and belongs to ``group``/``key``; else raise ValueError."""
    body, crc = value[:-4], value[-4:]
    if len(value) < 4 or zlib.crc32(body).to_bytes(4, "little") != crc:
        raise ValueError(f"torn value for {group}/{key}: {value[:60]!r}...")
    parts = body.split(b"|", 4)
    if len(parts) != 5 or parts[0].decode() != group or parts[1].decode() != key:
        raise ValueError(f"value of another key under {group}/{key}: {value[:60]!r}")
    writer, seq = int(parts[2]), int(parts[3])
    start = seq % 256
    if parts[4] != _PAD[start:start + len(parts[4])]:
        raise ValueError(f"corrupt payload for {group}/{key}")
    return writer, seq
