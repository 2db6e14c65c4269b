"""shmcache (K-Cache): a groupcache-style cache whose host-local tier lives in shared memory."""

from .client import Client
from .handles import connect, create
from .group import Group
from .errors import (AuthError, ClientClosed, CorruptSegment, InvalidArgument, InvalidKey, LoadError,
                     LoadTimeout, NotAnInteger, NotFound, PeerUnavailable, SegmentCreateError,
                     SegmentIncompatible, SegmentInUse, SegmentNotFound, ShmcacheError,
                     UnknownGroup, ValueTooLarge)

__version__ = "0.1.0"

__all__ = [
    "Client", "Group", "connect", "create", "__version__",
    "ShmcacheError", "NotFound", "UnknownGroup", "LoadError", "PeerUnavailable",
    "ValueTooLarge", "InvalidKey", "SegmentIncompatible", "SegmentNotFound",
    "SegmentInUse", "SegmentCreateError", "ClientClosed", "AuthError", "LoadTimeout",
    "InvalidArgument", "NotAnInteger", "CorruptSegment",
]
