"""The narrow exceptions shmcache raises; all derive from ``ShmcacheError``."""


class ShmcacheError(Exception):
    """Base class of every error shmcache raises on purpose."""


class NotFound(ShmcacheError, KeyError):
    """The key does not exist: the getter raised KeyError, or an owner answered 404."""

    def __str__(self):  # KeyError quotes its argument; a message reads better plain
        return str(self.args[0]) if self.args else "not found"


class UnknownGroup(ShmcacheError, KeyError):
    """No group of that name is defined in the segment."""

    def __str__(self):
        return str(self.args[0]) if self.args else "unknown group"


class LoadError(ShmcacheError):
    """The group's getter failed (raised something other than KeyError, or returned a bad type)."""


class LoadTimeout(LoadError):
    """Waiting for a load (another process's, or the host front's) took longer than allowed."""


class PeerUnavailable(ShmcacheError):
    """A peer (or the local front) could not be reached or did not answer in time."""


class AuthError(ShmcacheError, PermissionError):
    """The host wants a token (``connect(token=...)`` or $SHMCACHE_TOKEN) and got none or a
    wrong one."""


class InvalidArgument(ShmcacheError, ValueError):
    """An argument is malformed or out of range: a byte size, a TTL, a group or segment name."""


class ValueTooLarge(ShmcacheError, ValueError):
    """The value exceeds the max item size or the group's whole byte budget; nothing was stored."""


class NotAnInteger(ShmcacheError, TypeError):
    """``incr`` met a value that is not a whole number in decimal digits (or a non-int delta)."""


class InvalidKey(ShmcacheError, ValueError):
    """The key is empty, too long, or not str/bytes."""


class SegmentIncompatible(ShmcacheError):
    """The shared-memory segment has an unknown magic number or layout version, or is malformed."""


class CorruptSegment(ShmcacheError):
    """An audit (``Store.audit()``) found the segment's shared structures inconsistent: a
    chain, an LRU ring, a byte count, a slab page or free list that does not add up. The
    arguments name the first inconsistency found."""


class SegmentNotFound(ShmcacheError, FileNotFoundError):
    """No shared-memory segment of that name exists."""


class SegmentInUse(ShmcacheError, FileExistsError):
    """A segment of that name already exists and is owned by a live supervisor."""


class SegmentCreateError(ShmcacheError, OSError):
    """The segment could not be created (for example /dev/shm has too little free space)."""


class ClientClosed(ShmcacheError, ValueError):
    """The client was closed (``close()``, or the end of its ``with`` block); it reads and
    writes nothing any more."""
