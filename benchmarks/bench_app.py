"""Groups for the benchmarks: values of a fixed size, computed at once (no I/O)."""

from shmcache import Group

VALUE_SIZE = 100


def load(key):
    return (key.encode() * (VALUE_SIZE // max(1, len(key)) + 1))[:VALUE_SIZE]


groups = [Group("bench", 64 << 20, load)]


def soak_load(key):
    """Values the soak test can verify: the key, padded to VALUE_SIZE."""
    return (f"value-of-{key}|".encode() * VALUE_SIZE)[:VALUE_SIZE]


soak_groups = [Group("soak", 16 << 20, soak_load, ttl=120)]
