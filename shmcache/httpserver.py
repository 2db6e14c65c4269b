"""A small HTTP/1.1 server for one worker process: an epoll loop, keep-alive, limits, and
handlers that answer at once or hand back a Future. The messages themselves (parsing a
request, rendering a response) are http_messages.py's.

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
Those parts of the loop, which are not HTTP, are epoll_loop.py's.

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
import logging
import os
import select
import socket
import ssl
import threading
import time

from .epoll_loop import EpollLoop
from .http_messages import CONTINUE, BadRequest, Limits, error, parse_request
from .http_messages import render  # noqa: F401 (its old home, where the front imports it)
from .tls import NotTls, ServerSession

log = logging.getLogger("shmcache.http")

LINGER = 2.0                       # seconds to discard a refused client's input before closing
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP


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


class HttpServer(EpollLoop):
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
        self._listening = False
        super().__init__()                   # the epoll object, its wake fd, timers

    # -- control ----------------------------------------------------------------------------

    def stop(self):
        """Stop accepting; finish the requests in progress, then ``serve`` returns.
        Safe from a signal handler or another thread."""
        self.stopping = True
        self._wake()

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
                        self._run_soon()
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
        limits = self.limits
        while connection.inbuf and not connection.busy and not connection.closing:
            try:
                request = parse_request(connection, limits)
            except BadRequest as bad:
                self._send(connection, error(bad.status, bad.reason, close=True), close=True)
                return
            except Exception:                   # a parser bug: this client, not the worker
                log.exception("could not parse a request from %s", connection.peer)
                self._send(connection, error(400, "malformed request", close=True), close=True)
                return
            if not request:                     # incomplete: wait for more bytes
                if request is False:            # after telling the client to send its body
                    self._output(connection, CONTINUE)
                    self._flush(connection)
                return
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
