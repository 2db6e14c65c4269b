"""A small HTTP/1.1 server for one worker process: an epoll loop, keep-alive, limits, and
handlers that answer at once or hand back a Future.

Why not ``http.server``: it costs a thread and several writes per request (see DESIGN.md's
TCP_NODELAY note) and has no limits for slow or hostile clients. Here a cache hit is parsed,
answered and sent from the loop in one ``send``; anything that may block (a load, a peer
fetch) runs elsewhere and the handler returns a ``concurrent.futures.Future`` of the
response bytes. A connection handles one request at a time, so pipelined requests are
answered in order.

Handlers: ``handle(request) -> bytes | Future[bytes]``. They must not raise; if one does,
the client gets a plain 500 and the traceback goes to the log only.

Other parts of the worker may use the loop too, from the loop's own thread: ``watch`` a
descriptor (a callback per epoll event), ``call_later`` a function (a timer), and a Future
completed on the loop is answered without waking it (peer_fetch.py fetches from owners so).

Every worker process listens on the same inherited socket; EPOLLEXCLUSIVE wakes one of them
per new connection.

With ``tls`` (an SSLContext), every connection speaks TLS: the loop moves ciphertext between
the socket and a ``tls.ServerSession`` (memory buffers), so handshakes never block it. A
handshake must finish within ``header_timeout``; one that fails closes only its connection
(logged at debug level). A client speaking plain HTTP to the TLS port gets a plain-text 400
saying so, then the connection is closed.
"""

import collections
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import ssl
import threading
import time
from email.utils import formatdate

from .tls import NotTls, ServerSession

log = logging.getLogger("shmcache.http")

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
    414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER = 2.0                       # seconds to discard a refused client's input before closing
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP


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


class _Connection:
    __slots__ = ("sock", "fd", "peer", "inbuf", "outbuf", "busy", "closing", "last_active",
                 "started", "continued", "writing", "draining", "tls")

    def __init__(self, sock, peer, now):
        self.sock, self.fd, self.peer = sock, sock.fileno(), peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.busy = False          # a Future is computing the current response
        self.closing = False       # close once outbuf is flushed
        self.last_active = now
        self.started = None        # when the first byte of the pending request arrived
        self.continued = False     # "100 Continue" sent for the pending request
        self.writing = False       # registered for EPOLLOUT
        self.draining = False      # answered and shut for writing; discarding input until EOF
        self.tls = None            # its tls.ServerSession on a TLS front


class Timer:
    """A ``call_later`` that has not run yet; ``cancel()`` keeps it from running."""
    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def cancel(self):
        self.function = None


class _BadRequest(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


class HttpServer:
    """Serves ``handle`` on ``listener`` until ``stop()``; then drains and returns."""

    def __init__(self, listener, handle, limits=None, tls=None):
        self.listener = listener
        self.tls = tls                       # the front's SSLContext, or None for plain HTTP
        self.handle = handle
        self.limits = limits or Limits()
        self._largest_body = max(self.limits.max_body, self.limits.max_post_body or 0)
        self.connections = {}                # fd -> _Connection
        self.completed = collections.deque()  # (connection, response bytes) from other threads
        self.stopping = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._listening = False
        self._watched = {}                   # fd -> callback(events), see ``watch``
        self._timers = []                    # heap of (when, sequence, Timer)
        self._compact_at = 4096              # heap size that makes call_later drop cancelled
        self._sequence = itertools.count()
        self._loop_thread = None             # ident of the thread running ``serve``

    # -- the loop for others (its own thread only) ---------------------------------------------

    def in_loop(self):
        """True on the thread running the loop."""
        return threading.get_ident() == self._loop_thread

    def watch(self, fd, events, callback):
        """Call ``callback(events)`` on the loop when ``fd`` has any of ``events``."""
        self._watched[fd] = callback
        self._epoll.register(fd, events)

    def rewatch(self, fd, events):
        """Change the events ``fd`` is watched for."""
        self._epoll.modify(fd, events)

    def unwatch(self, fd):
        """Stop watching ``fd`` (before closing it)."""
        if self._watched.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def call_later(self, delay, function):
        """Run ``function()`` on the loop in ``delay`` seconds; a Timer to cancel it."""
        timer = Timer(function)
        timers = self._timers
        if len(timers) >= self._compact_at:     # most are cancelled deadlines: drop them
            timers[:] = [entry for entry in timers if entry[2].function is not None]
            heapq.heapify(timers)
            self._compact_at = max(4096, 2 * len(timers))
        heapq.heappush(timers, (time.monotonic() + delay, next(self._sequence), timer))
        return timer

    def _run_timers(self, now):
        timers = self._timers
        while timers and timers[0][0] <= now:
            function = heapq.heappop(timers)[2].function
            if function is not None:
                try:
                    function()
                except Exception:
                    log.exception("timer failed")

    # -- control ----------------------------------------------------------------------------

    def stop(self):
        """Stop accepting; finish the requests in progress, then ``serve`` returns.
        Safe from a signal handler or another thread."""
        self.stopping = True
        self._wake()

    def _wake(self):
        try:
            os.eventfd_write(self._wake_fd, 1)
        except BlockingIOError:          # counter full: the loop is awake anyway
            pass

    def serve(self, tick=None, tick_interval=1.0):
        """Run the loop. ``tick()`` runs about every ``tick_interval`` seconds."""
        epoll = self._epoll
        self.listener.setblocking(False)
        epoll.register(self.listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self._listening = True
        epoll.register(self._wake_fd, select.EPOLLIN)
        next_tick = time.monotonic() + tick_interval
        listen_fd = self.listener.fileno()
        self._loop_thread = threading.get_ident()
        timers = self._timers
        try:
            while True:
                if self.stopping:
                    self._begin_drain()
                    if not self.connections:
                        return
                wake_at = min(next_tick, timers[0][0]) if timers else next_tick
                timeout = max(0.0, wake_at - time.monotonic())
                for fd, events in epoll.poll(timeout):
                    if fd == listen_fd:
                        self._accept()
                    elif fd == self._wake_fd:
                        try:
                            os.eventfd_read(self._wake_fd)
                        except BlockingIOError:
                            pass
                        self._drain_completions()
                    else:
                        connection = self.connections.get(fd)
                        if connection is None:
                            callback = self._watched.get(fd)
                            if callback is not None:
                                callback(events)
                            continue
                        if events & _READ_EVENTS:
                            self._on_readable(connection)
                        if events & select.EPOLLOUT and self.connections.get(fd) is connection:
                            self._flush(connection)
                now = time.monotonic()
                if timers and timers[0][0] <= now:
                    self._run_timers(now)
                if self.completed:                # answered on the loop: no wake needed
                    self._drain_completions()
                if now >= next_tick:
                    next_tick = now + tick_interval
                    self._expire_timeouts(now)
                    if tick is not None:
                        tick()
        finally:
            for connection in list(self.connections.values()):
                self._close(connection)
            if self._listening:
                epoll.unregister(listen_fd)
            epoll.close()
            # The wake eventfd stays open: a Future still running may signal it, and a closed
            # descriptor number could by then belong to something else. The process exits next.

    def _begin_drain(self):
        if self._listening:
            self._epoll.unregister(self.listener.fileno())
            self._listening = False
        for connection in list(self.connections.values()):
            connection.closing = True
            if not connection.busy and not connection.outbuf:
                self._close(connection)

    # -- connections ------------------------------------------------------------------------

    def _accept(self):
        now = time.monotonic()
        while True:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # EMFILE and friends: log, keep serving
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed: %s", exc.strerror)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            if len(self.connections) >= self.limits.max_connections:
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(sock, peer, now)
            if self.tls is not None:
                connection.tls = ServerSession(self.tls)
                connection.started = now       # the handshake's deadline runs from here
            self.connections[connection.fd] = connection
            self._epoll.register(connection.fd, select.EPOLLIN | select.EPOLLRDHUP)

    def _close(self, connection):
        if self.connections.pop(connection.fd, None) is None:
            return
        try:
            self._epoll.unregister(connection.fd)
        except (OSError, ValueError):
            pass
        connection.sock.close()

    def _on_readable(self, connection):
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection)
            return
        if not data:
            self._close(connection)
            return
        if connection.draining:
            return                             # discard until the client closes
        if connection.tls is not None:
            data = self._decrypt(connection, data)
            if not data:
                return                         # handshake under way, partial record, or closed
        connection.last_active = time.monotonic()
        if connection.started is None:
            connection.started = connection.last_active
        if connection.closing:
            return                             # ignore more input; answer what is pending
        connection.inbuf += data
        if not connection.busy:
            self._process(connection)
        elif len(connection.inbuf) > self._largest_body + self.limits.max_header_bytes:
            self._close(connection)            # pipelining more than a request's worth: abuse

    def _decrypt(self, connection, data):
        """The plaintext that ciphertext ``data`` completes; b"" if none yet, or if the
        connection was closed or refused meanwhile."""
        session = connection.tls
        handshaking = not session.established
        try:
            data = session.receive(data)
        except NotTls:
            connection.tls = None              # say so in plain text, then close
            connection.started = time.monotonic()
            self._send(connection, error(400, "this port speaks HTTPS: use https://",
                                         close=True), close=True)
            return b""
        except (ssl.SSLError, EOFError) as exc:
            log.debug("TLS connection from %s closed: %s", connection.peer, exc)
            alert = session.outgoing()        # a failed handshake's alert, if any
            if alert:
                try:
                    connection.sock.send(alert)
                except OSError:
                    pass
            self._close(connection)
            return b""
        produced = session.outgoing()
        if produced:
            connection.outbuf += produced
            self._flush(connection)
            if self.connections.get(connection.fd) is not connection:
                return b""
        if handshaking and session.established:
            connection.started = None          # from now on, timeouts as for plain HTTP
        return data

    def _output(self, connection, data):
        """Queue ``data`` (plaintext) for sending, encrypted on a TLS connection (one whose
        session refuses to encrypt is closed)."""
        if connection.tls is None:
            connection.outbuf += data
            return
        try:
            connection.outbuf += connection.tls.encrypt(data)
        except ssl.SSLError as exc:
            log.debug("TLS connection from %s closed: %s", connection.peer, exc)
            connection.closing = True
            self._close(connection)

    def _process(self, connection):
        """Answer every complete request in the buffer, in order, until one needs a Future."""
        while connection.inbuf and not connection.busy and not connection.closing:
            try:
                request = self._parse(connection)
            except _BadRequest as bad:
                self._send(connection, error(bad.status, bad.reason, close=True), close=True)
                return
            if request is None:
                return                          # incomplete: wait for more bytes
            connection.started = time.monotonic() if connection.inbuf else None
            connection.continued = False
            try:
                response = self.handle(request)
            except Exception:                   # a handler bug: log it, tell the client little
                log.exception("handler failed for %s %s", request.method, request.target)
                response = error(500, "internal error", close=not request.keep_alive)
            if isinstance(response, (bytes, bytearray)):
                self._send(connection, response, close=not request.keep_alive)
            else:
                connection.busy = True
                keep_alive = request.keep_alive
                response.add_done_callback(
                    lambda future, c=connection, k=keep_alive: self._complete(c, future, k))

    def _complete(self, connection, future, keep_alive):
        """Future done (any thread): queue the response for the loop."""
        try:
            response = future.result()
        except Exception:
            log.exception("deferred handler failed")
            response = error(500, "internal error", close=not keep_alive)
        self.completed.append((connection, response, keep_alive))
        if threading.get_ident() != self._loop_thread:
            self._wake()

    def _drain_completions(self):
        while self.completed:
            connection, response, keep_alive = self.completed.popleft()
            if self.connections.get(connection.fd) is not connection:
                continue                         # the client went away meanwhile
            connection.busy = False
            self._send(connection, response, close=not keep_alive)
            if self.connections.get(connection.fd) is connection and connection.inbuf:
                self._process(connection)

    def _send(self, connection, response, close=False):
        if close or self.stopping:
            connection.closing = True
            head, sep, body = response.partition(b"\r\n\r\n")
            if b"\r\nConnection: close" not in head:
                response = head + b"\r\nConnection: close" + sep + body
        self._output(connection, response)
        self._flush(connection)

    def _flush(self, connection):
        if self.connections.get(connection.fd) is not connection:
            return                               # closed meanwhile
        out = connection.outbuf
        while out:
            try:
                sent = connection.sock.send(out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(connection)
                return
            del out[:sent]
            connection.last_active = time.monotonic()   # a slow reader that reads is alive
        if out:
            if not connection.writing:
                self._epoll.modify(connection.fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP)
                connection.writing = True
            return
        if connection.writing:
            self._epoll.modify(connection.fd, select.EPOLLIN | select.EPOLLRDHUP)
            connection.writing = False
        if connection.closing and not connection.busy:
            self._linger(connection)

    def _linger(self, connection):
        """Close after an answer, without losing it: a client still sending (a body we
        refused) would otherwise get a TCP reset that can destroy the unread response. So
        shut our side, discard its input until it closes or LINGER seconds pass."""
        if connection.draining:
            return
        if not connection.inbuf and not connection.started:
            self._close(connection)
            return
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        connection.draining = True
        connection.inbuf = bytearray()
        connection.last_active = time.monotonic()

    def _expire_timeouts(self, now):
        limits = self.limits
        for connection in list(self.connections.values()):
            if connection.draining:
                if now - connection.last_active > LINGER:
                    self._close(connection)
                continue
            if connection.tls is not None and not connection.tls.established:
                if now - connection.started > limits.header_timeout:
                    log.debug("TLS handshake from %s timed out", connection.peer)
                    self._close(connection)    # no HTTP spoken yet: nothing to answer in
                continue
            if connection.busy:
                continue
            if connection.started is not None and connection.inbuf:
                waited = now - connection.started
                in_body = b"\r\n\r\n" in connection.inbuf or b"\n\n" in connection.inbuf
                if waited > (limits.body_timeout if in_body else limits.header_timeout):
                    self._send(connection, error(408, "request took too long to arrive",
                                                 close=True), close=True)
                    continue
            if not connection.inbuf and not connection.outbuf and \
                    now - connection.last_active > limits.idle_timeout:
                self._close(connection)
            elif connection.outbuf and now - connection.last_active > limits.body_timeout:
                self._close(connection)          # the client stopped reading

    # -- parsing ----------------------------------------------------------------------------

    def _parse(self, connection):
        """The next whole request in ``connection.inbuf`` (consumed), or None if incomplete."""
        buf = connection.inbuf
        limits = self.limits
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            body_start = end + 4
        else:
            end = buf.find(b"\n\n")
            body_start = end + 2
        if end < 0:
            line_end = buf.find(b"\n")
            if line_end < 0 and len(buf) > limits.max_request_line:
                raise _BadRequest(414, "request line too long")
            if len(buf) > limits.max_header_bytes:
                raise _BadRequest(431, "request headers too large")
            return None
        if end > limits.max_header_bytes:
            raise _BadRequest(431, "request headers too large")
        lines = bytes(buf[:end]).split(b"\n")
        request_line = lines[0].rstrip(b"\r")
        if len(request_line) > limits.max_request_line:
            raise _BadRequest(414, "request line too long")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[0] or not _METHOD_CHARS.issuperset(parts[0]):
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):       # 400, not 505: bad input never
            raise _BadRequest(400, "only HTTP/1.0 and HTTP/1.1 are served")   # gets a 5xx
        if len(lines) - 1 > limits.max_headers:
            raise _BadRequest(431, "too many header fields")
        headers = {}
        for line in lines[1:]:
            line = line.rstrip(b"\r")
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name:
                raise _BadRequest(400, "malformed header field")
            name = name.lower().decode("latin-1")
            value = value.strip().decode("latin-1")
            if name in headers:
                if name in ("content-length", "host", "authorization", "transfer-encoding"):
                    if headers[name] != value:
                        raise _BadRequest(400, f"conflicting {name} headers")
                    continue
                value = headers[name] + ", " + value
            headers[name] = value
        if "transfer-encoding" in headers:
            raise _BadRequest(411, "chunked transfer encoding is not supported: send Content-Length")
        length_text = headers.get("content-length")
        length = 0
        if length_text is not None:
            if not length_text.isdigit() or len(length_text) > 12:
                raise _BadRequest(400, "bad Content-Length")
            length = int(length_text)
            limit = limits.max_post_body if method == b"POST" and limits.max_post_body \
                else limits.max_body
            if length > limit:
                raise _BadRequest(413, f"body of {length} bytes exceeds the limit of "
                                       f"{limit} bytes")
        if len(buf) - body_start < length:
            if not connection.continued and headers.get("expect", "").lower() == "100-continue":
                connection.continued = True
                self._output(connection, _CONTINUE)
                self._flush(connection)
            return None
        body = bytes(buf[body_start:body_start + length])
        del buf[:body_start + length]
        connection_header = headers.get("connection", "").lower()
        if version == b"HTTP/1.1":
            keep_alive = "close" not in connection_header
        else:
            keep_alive = "keep-alive" in connection_header
        target = target.decode("latin-1")
        if target.startswith(("http://", "https://")):      # absolute-form
            slash = target.find("/", target.find("//") + 2)
            target = target[slash:] if slash >= 0 else "/"
        if not target.startswith("/"):
            raise _BadRequest(400, "request target must be a path")
        return Request(method.decode(), target, version.decode(), headers, body, keep_alive,
                       connection.peer)
