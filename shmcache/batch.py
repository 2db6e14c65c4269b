"""The batch route's JSON bodies, shared by the front (http_front.py) and its clients.

    POST /cache/<group>?op=get      {"keys": ["k1", ...]}
        200 {"values": {"k1": "<base64>"}, "missing": ["k2"],
             "errors": {"k3": {"status": 500, "reason": "..."}}}
    POST /cache/<group>?op=set      {"items": {"k1": "<base64>"}, "ttl": 60}   (ttl optional)
        200 {"stored": N}; 502 {"stored": N, "failed_peers": [url, ...], "peer_errors": {...}}
    POST /cache/<group>?op=delete   {"keys": ["k1", ...]}
        200 {"deleted": ["k1"]}; 502 {"deleted": [...], "failed_peers": [...], ...}

At most MAX_BATCH_KEYS keys a request. Only json and base64 here: clients import it.
"""

import base64
import binascii
import json

MAX_BATCH_KEYS = 10_000
MIN_BATCH_BODY = 64 << 20       # bytes a POST body may have, at least (see max_batch_body)
OPS = ("get", "set", "delete")


def max_batch_body(max_item_size):
    """The largest POST body a front takes: 64 MiB, or room for one value of the max item
    size (base64 makes 4 bytes of 3) if that is more."""
    return max(MIN_BATCH_BODY, max_item_size * 4 // 3 + (1 << 16))


def encode(document):
    return json.dumps(document, separators=(",", ":")).encode()


def b64(value):
    return base64.b64encode(value).decode("ascii")


def unb64(text):
    """bytes of a base64 string; ValueError if it is not one."""
    if not isinstance(text, str):
        raise ValueError("values must be base64 strings")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a value is not valid base64") from None


def decode_get_answer(data):
    """(values {key: bytes}, errors {key: (status, reason)}) of a get answer; ValueError if
    it is not one."""
    try:
        answer = json.loads(data)
        values = {key: unb64(text) for key, text in answer["values"].items()}
        errors = {key: (int(error["status"]), str(error["reason"]))
                  for key, error in answer.get("errors", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a batch get answer: {exc}") from None
    return values, errors


def chunks(items, size=MAX_BATCH_KEYS):
    """``items`` (a list) in lists of at most ``size``."""
    return [items[start:start + size] for start in range(0, len(items), size)]
