"""Read-modify-write operations of a Store: add, incr and touch.

Each is one step under the write lock (``Store.locked`` is not re-entrant: the ``*_locked``
parts call the Index only), so processes racing on a key see them one after the other: of
processes adding one key at once exactly one succeeds, and no increment is lost.
``ReadModifyWrite`` is a part of ``Store`` (store.py), which it relies on for ``locked``,
``group_id``, ``index`` and ``_expiry``.
"""

import re
import time

from .errors import NotAnInteger
from .slabs import STATE_HOT, STATE_LIVE
from .validate import encode_key, encode_value

_DECIMAL = re.compile(rb"-?[0-9]{1,4000}")


def decimal_value(value):
    """The whole number a value holds as decimal ASCII digits (what ``incr`` works on, as in
    memcached); NotAnInteger if it holds anything else."""
    if not _DECIMAL.fullmatch(value):
        raise NotAnInteger("the value is not a whole number in decimal digits")
    return int(value)



class ReadModifyWrite:
    """add, incr and touch: Store's writes that read the key first, in the same step."""

    def add(self, group, key, value, ttl=None, expire_at=None):
        """Store ``value`` as ``set`` does, but only if the key holds no live value; True if
        stored. Of processes adding one key at once, exactly one gets True."""
        gid = self.group_id(group)
        data, value = encode_key(key), encode_value(value)
        now = time.time()
        return self.locked(self._add_locked, gid, data, value,
                           self._expiry(gid, ttl, expire_at, now), now)

    def _add_locked(self, gid, data, value, expire_at, now):
        if self.index.lookup_locked(gid, data, now) is not None:
            return False
        return self.index.store(gid, data, value, expire_at, now)

    def incr(self, group, key, delta=1):
        """Add ``delta`` to the whole number the key holds in decimal digits, atomically; the
        key keeps its expiry. The new number, or None if the key holds no live value.
        NotAnInteger if the value is anything else (nothing changes then)."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise NotAnInteger(f"delta must be an int, not {type(delta).__name__}")
        gid = self.group_id(group)
        return self.locked(self._incr_locked, gid, encode_key(key), delta, time.time())

    def _incr_locked(self, gid, data, delta, now):
        found = self.index.lookup_locked(gid, data, now, with_expiry=True)
        if found is None:
            return None
        value, expire_at, hot = found
        number = decimal_value(value) + delta
        self.index.store(gid, data, b"%d" % number, expire_at, now,
                         STATE_HOT if hot else STATE_LIVE)
        return number

    def touch(self, group, key, ttl=None, expire_at=None):
        """Give a live key a new expiry (``ttl`` / ``expire_at`` as in ``set``); True if the
        key was there."""
        gid = self.group_id(group)
        now = time.time()
        return self.locked(self._touch_locked, gid, encode_key(key),
                           self._expiry(gid, ttl, expire_at, now), now)

    def _touch_locked(self, gid, data, expire_at, now):
        found = self.index.lookup_locked(gid, data, now, with_expiry=True)
        if found is None:
            return False
        value, _old_expiry, hot = found
        return self.index.store(gid, data, value, expire_at, now,
                                STATE_HOT if hot else STATE_LIVE)
