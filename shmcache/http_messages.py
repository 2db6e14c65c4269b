"""HTTP/1.1 messages as a worker reads and writes them. Its server's (httpserver.py): the
limits one request may use, ``parse_request`` (the next whole request of a connection's
input buffer, or a BadRequest for its 4xx answer), and ``render``/``error``, which make a
whole response as bytes. Its fetches from owners' (peer_fetch.py): ``parse_response``, a
whole response read back. No sockets here: the event loop that moves the bytes is
httpserver.py's.
"""

import time
from email.utils import formatdate

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
    414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
_METHOD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# The head of a request is parsed as latin-1 text (one character per byte, one decode per
# request): these keep str's methods to what bytes' did, ASCII whitespace and ASCII case.
_WS = " \t\n\r\x0b\x0c"
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Limits:
    """What one request and one connection may use. Defaults suit a cache front."""
    max_request_line = 8192          # bytes, else 414
    max_header_bytes = 16384         # bytes of the whole header block, else 431
    max_headers = 100                # header fields, else 431
    max_body = 1 << 20               # bytes, else 413 (set to the max item size)
    max_post_body = None             # bytes of a POST body (batches), if not max_body
    header_timeout = 10.0            # seconds from a request's first byte to its last header
    body_timeout = 30.0              # seconds to receive a declared body
    idle_timeout = 75.0              # seconds a keep-alive connection may sit idle
    max_connections = 4096           # per worker; more are closed at once

    def __init__(self, **overrides):
        for name, value in overrides.items():
            if not hasattr(Limits, name):
                raise TypeError(f"unknown limit {name!r}")
            setattr(self, name, value)


class Request:
    """One parsed request. ``target`` is the raw request-target (percent-encoded)."""
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body",
                 "keep_alive", "peer")

    def __init__(self, method, target, version, headers, body, keep_alive, peer):
        self.method, self.target, self.version = method, target, version
        self.headers, self.body, self.keep_alive, self.peer = headers, body, keep_alive, peer
        path, _, self.query = target.partition("?")
        self.path = path


_date_cache = [0, b""]


def _date_header():
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode()
    return _date_cache[1]


def render(status, body=b"", content_type=b"text/plain; charset=utf-8", headers=(), head=False,
           close=False):
    """A whole HTTP/1.1 response as bytes. ``body`` may be str (sent as UTF-8)."""
    if isinstance(body, str):
        body = body.encode()
    lines = [b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Length: %d\r\n"
             % (status, REASONS.get(status, "Unknown").encode(), _date_header(), len(body))]
    if status not in (204, 304):           # an empty value is still of its type
        lines.append(b"Content-Type: %s\r\n" % content_type)
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(body)
    return b"".join(lines)


def error(status, reason, **kwargs):
    """A short text error response: the reason on one line."""
    return render(status, reason.rstrip("\n") + "\n", **kwargs)




class BadRequest(Exception):
    """A request that gets a 4xx answer (``status``, ``reason``), and its connection closed."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_request(connection, limits):
    """The next whole request in ``connection.inbuf`` (consumed); None if incomplete;
    False if incomplete and "100 Continue" (CONTINUE) is now due, the body being awaited.
    BadRequest if it is not one to serve within ``limits``."""
    buf = connection.inbuf
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        body_start = end + 4
    else:
        end = buf.find(b"\n\n")
        body_start = end + 2
    if end < 0:
        line_end = buf.find(b"\n")
        if line_end < 0 and len(buf) > limits.max_request_line:
            raise BadRequest(414, "request line too long")
        if len(buf) > limits.max_header_bytes:
            raise BadRequest(431, "request headers too large")
        return None
    if end > limits.max_header_bytes:
        raise BadRequest(431, "request headers too large")
    lines = buf[:end].decode("latin-1").split("\n")
    request_line = lines[0].rstrip("\r")
    if len(request_line) > limits.max_request_line:
        raise BadRequest(414, "request line too long")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0] or not _METHOD_CHARS.issuperset(parts[0]):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):       # 400, not 505: bad input never
        raise BadRequest(400, "only HTTP/1.0 and HTTP/1.1 are served")    # gets a 5xx
    if len(lines) - 1 > limits.max_headers:
        raise BadRequest(431, "too many header fields")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.rstrip("\r").partition(":")
        if not colon or not name or name != name.strip(_WS) or " " in name:
            raise BadRequest(400, "malformed header field")
        name = name.lower() if name.isascii() else name.translate(_ASCII_LOWER)
        value = value.strip(_WS)
        if name in headers:
            if name in ("content-length", "host", "authorization", "transfer-encoding"):
                if headers[name] != value:
                    raise BadRequest(400, f"conflicting {name} headers")
                continue
            value = headers[name] + ", " + value
        headers[name] = value
    if "transfer-encoding" in headers:
        raise BadRequest(411, "chunked transfer encoding is not supported: send Content-Length")
    length_text = headers.get("content-length")
    length = 0
    if length_text is not None:
        # isdigit alone takes "²" (latin-1 0xB2), which int() refuses: ASCII digits only
        if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 12:
            raise BadRequest(400, "bad Content-Length")
        length = int(length_text)
        limit = limits.max_post_body if method == "POST" and limits.max_post_body \
            else limits.max_body
        if length > limit:
            raise BadRequest(413, f"body of {length} bytes exceeds the limit of "
                                  f"{limit} bytes")
    if len(buf) - body_start < length:
        if not connection.continued and headers.get("expect", "").lower() == "100-continue":
            connection.continued = True
            return False
        return None
    body = bytes(buf[body_start:body_start + length])
    del buf[:body_start + length]
    connection_header = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection_header
    else:
        keep_alive = "keep-alive" in connection_header
    if target.startswith(("http://", "https://")):      # absolute-form
        slash = target.find("/", target.find("//") + 2)
        target = target[slash:] if slash >= 0 else "/"
    if not target.startswith("/"):
        raise BadRequest(400, "request target must be a path")
    return Request(method, target, version, headers, body, keep_alive, connection.peer)


def parse_response(buf, closed):
    """(status, body, keep_alive) of the whole response in ``buf``; None if incomplete.
    ValueError if it is not HTTP/1.x."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(repr(lines[0][:80]))
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    keep = parts[0] == b"HTTP/1.1" and b"close" not in headers.get(b"connection", b"")
    start = end + 4
    length = headers.get(b"content-length")
    if length is not None:
        if not length.isdigit():
            raise ValueError("bad Content-Length")
        length = int(length)
        if len(buf) - start < length:
            return None
        return status, bytes(buf[start:start + length]), keep
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        body = _dechunk(buf, start)
        return None if body is None else (status, body, keep)
    if status in (204, 304) or 100 <= status < 200:
        return status, b"", keep
    if not closed:                     # the body runs until the peer closes
        return None
    return status, bytes(buf[start:]), False


def _dechunk(buf, at):
    """The body of a chunked response starting at ``at``; None if incomplete."""
    chunks = []
    while True:
        line_end = buf.find(b"\r\n", at)
        if line_end < 0:
            return None
        size_text = bytes(buf[at:line_end]).split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ValueError("bad chunk size") from None
        at = line_end + 2
        if size == 0:
            return b"".join(chunks) if buf.find(b"\r\n", at) >= 0 else None
        if len(buf) < at + size + 2:
            return None
        chunks.append(bytes(buf[at:at + size]))
        at += size + 2
