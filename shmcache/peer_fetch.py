"""Fetches from owners on the worker's own event loop: no thread hop, no blocking socket.

A miss whose owner is another host (step 2 of the Get path) used to wait for a pool thread
and a blocking ``http.client`` request. Here the request is a small state machine driven by
the worker's epoll loop (httpserver.py), its answer a Future completed on the loop:

    connect      non-blocking connect(); EPOLLOUT says it is done (SO_ERROR says how)
    handshake    https:// peers: TLS over memory buffers (ssl.MemoryBIO), the certificate
                 verified for the URL's host name as PeerClient verifies it
    send         the GET request, all at once when the socket takes it (it nearly always
                 does), else the rest on EPOLLOUT
    receive      the status line, headers and a Content-Length (or chunked, or until-close)
                 body (read by http_messages.parse_response); then the connection
                 goes back to its peer's idle pool

Each peer keeps up to POOL_SIZE idle keep-alive connections, and has at most
MAX_CONNECTIONS open at once (as many as a worker has threads by default): a fetch beyond
that waits for a connection to come free, within its read timeout. An idle connection stays
registered with the loop, so a peer closing it is noticed (and it is dropped) without a
system call per request. A reused connection that the peer closed before answering is
retried once on a new one, as PeerClient does.

Timeouts: the connect and the handshake must be done within the peer's connect timeout,
and the answer must be complete within its read timeout from then; otherwise the Future
fails with PeerUnavailable ("timed out"), as every transport failure does. What a status
means (404 NotFound, 5xx PeerError) is PeerClient's, so both paths answer alike.

Host names are resolved off the loop: getaddrinfo runs on a short-lived thread (one per
name at a time, however many fetches wait for it) and hands its answer back to the loop
(``call_soon_threadsafe``), so a slow or dead resolver delays only the fetches to that peer
(bounded by their connect timeout), never the loop. Answers are kept RESOLVE_TTL seconds;
after that the old addresses are still used while a new lookup runs beside (and kept if it
fails). Peers named by IP address are resolved at once, without a thread.

Everything here runs on the loop's thread only.
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

from .errors import PeerUnavailable
from .futures import Promise
from .http_messages import parse_response
from .peers import POOL_SIZE
from .tls import trust_of, verify_problem

log = logging.getLogger("shmcache")

RESOLVE_TTL = 60.0
MAX_CONNECTIONS = 64         # open connections per peer, idle or busy
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_CONNECT, _HANDSHAKE, _SEND, _RECEIVE, _IDLE = range(5)


class PeerFetcher:
    """GETs to peers' peer routes on ``loop`` (an HttpServer: watch, rewatch, unwatch,
    call_later). ``fetch``/``peek`` answer like PeerClient's, as Futures."""

    def __init__(self, loop, getaddrinfo=socket.getaddrinfo):
        self.loop = loop
        self.getaddrinfo = getaddrinfo    # called on resolver threads only
        self._idle = {}            # peer url -> [_Connection] ready for a request
        self._open = collections.Counter()   # peer url -> connections open
        self._waiting = {}         # peer url -> deque of _Exchanges waiting for a connection
        self._addresses = {}       # (host, port) -> (resolved at, [(family, sockaddr)])
        self._resolving = {}       # (host, port) -> [callbacks] while a lookup runs

    def in_loop(self):
        return self.loop.in_loop()

    def fetch(self, client, group, key):
        """Future of (value, expiry) from the owner ``client`` (a PeerClient); NotFound on
        404, PeerError on other statuses, PeerUnavailable if it cannot be reached."""
        return self._get(client, client.path(group, key), client.fetch_answer)

    def _get(self, client, path, answer):
        result = Promise()
        _Exchange(self, client, path, answer, result).start()
        return result

    # -- connections ----------------------------------------------------------------------

    def acquire(self, exchange):
        """Start ``exchange`` on an idle connection, else on a new one, else (the peer has
        MAX_CONNECTIONS open) once one comes free."""
        url = exchange.client.url
        idle = self._idle.get(url)
        while idle:
            connection = idle.pop()
            if connection.alive:
                exchange.reuse(connection)
                return
        if self._open[url] < MAX_CONNECTIONS:
            exchange.connect()
        else:
            self._waiting.setdefault(url, collections.deque()).append(exchange)
            exchange.wait()

    def _next_waiting(self, url):
        """The first exchange still waiting for a connection to ``url``, or None."""
        waiting = self._waiting.get(url)
        while waiting:
            exchange = waiting.popleft()
            if not exchange.result.done():
                return exchange
        return None

    def checkin(self, connection):
        """A connection whose answer was read whole: to a waiting fetch, or idle."""
        exchange = self._next_waiting(connection.url)
        if exchange is not None:
            exchange.reuse(connection)
            return
        idle = self._idle.setdefault(connection.url, [])
        if len(idle) < POOL_SIZE:
            connection.idle()
            idle.append(connection)
        else:
            connection.close()

    def opened(self, url):
        self._open[url] += 1

    def closed(self, url):
        """A connection to ``url`` closed: a waiting fetch may open one (soon, not from
        inside whatever closed it)."""
        self._open[url] -= 1
        if self._waiting.get(url):
            self.loop.call_later(0, lambda: self._connect_waiting(url))

    def _connect_waiting(self, url):
        if self._open[url] < MAX_CONNECTIONS:
            exchange = self._next_waiting(url)
            if exchange is not None:
                exchange.connect()

    def addresses(self, host, port, then):
        """Call ``then`` on the loop with where ``host:port`` is ([(family, sockaddr)]), or
        with the OSError of a failed lookup: at once if known (or an IP address), else when
        the lookup on a resolver thread is done."""
        key = (host, port)
        known = self._addresses.get(key)
        if known is not None:
            if time.monotonic() - known[0] > RESOLVE_TTL and key not in self._resolving:
                self._lookup(key, [])                # the old answer serves meanwhile
            then(known[1])
            return
        try:                                         # an IP address: no lookup, no thread
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            waiting = self._resolving.get(key)
            if waiting is not None:
                waiting.append(then)
            else:
                self._lookup(key, [then])
            return
        self._addresses[key] = (time.monotonic(), [(info[0], info[4]) for info in found])
        then(self._addresses[key][1])

    def _lookup(self, key, waiting):
        """Resolve ``key`` on a thread of its own; ``waiting``: callbacks for its answer."""
        self._resolving[key] = waiting

        def lookup():
            try:
                found = self.getaddrinfo(*key, type=socket.SOCK_STREAM)
                outcome = [(info[0], info[4]) for info in found]
                if not outcome:
                    outcome = OSError(f"no address for {key[0]}")
            except OSError as exc:
                outcome = exc
            self.loop.call_soon_threadsafe(lambda: self._resolved(key, outcome))
        threading.Thread(target=lookup, name="shmcache-resolve", daemon=True).start()

    def _resolved(self, key, outcome):
        """(On the loop.) A lookup's answer: kept unless it failed (an older answer then
        stays for another RESOLVE_TTL), and given to who waits for it."""
        if not isinstance(outcome, OSError):
            self._addresses[key] = (time.monotonic(), outcome)
        elif key in self._addresses:             # asked again in RESOLVE_TTL, not at once
            self._addresses[key] = (time.monotonic(), self._addresses[key][1])
            log.warning("peer host %s no longer resolves (%s): keeping its last addresses",
                        key[0], outcome.strerror or outcome)
        for then in self._resolving.pop(key, ()):
            then(outcome)

    def close(self):
        self._waiting.clear()
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


class _Connection:
    """One socket to a peer (and its TLS session over memory buffers, for https://)."""
    __slots__ = ("fetcher", "loop", "url", "sock", "fd", "tls", "incoming", "outgoing",
                 "alive", "handler", "events")

    def __init__(self, fetcher, url, family):
        self.fetcher, self.loop, self.url = fetcher, fetcher.loop, url
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        fetcher.opened(url)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.tls = self.incoming = self.outgoing = None
        self.alive = True
        self.handler = None            # the exchange using it, told of every event
        self.events = _OUT
        self.loop.watch(self.fd, _OUT, self._on_event)

    def want(self, events):
        if events != self.events:
            self.events = events
            self.loop.rewatch(self.fd, events)

    def _on_event(self, events):
        if self.handler is not None:
            self.handler.on_event(events)
        else:                          # idle: the peer closed it, or sent what nobody asked
            self.close()

    def idle(self):
        self.handler = None
        self.want(_IN)

    def start_tls(self, context, server_name):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)

    def send_raw(self, data):
        """Bytes of ``data`` the socket took (0 if it is full). OSError if it broke."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def close(self):
        if self.alive:
            self.alive = False
            self.loop.unwatch(self.fd)
            self.sock.close()
            self.fetcher.closed(self.url)


class _Exchange:
    """One GET, from a connection (reused or new) to a whole response."""
    __slots__ = ("fetcher", "client", "path", "answer", "result", "connection", "state",
                 "reused", "timer", "pending", "received", "addresses", "retried")

    def __init__(self, fetcher, client, path, answer, result):
        self.fetcher, self.client, self.path = fetcher, client, path
        self.answer, self.result = answer, result
        self.connection = None
        self.timer = None
        self.pending = b""             # bytes still to send (ciphertext on TLS)
        self.received = bytearray()    # plaintext of the response so far
        self.addresses = None
        self.retried = False
        self.state = _CONNECT
        self.reused = False

    # -- life cycle ---------------------------------------------------------------------------

    def start(self):
        self.fetcher.acquire(self)

    def reuse(self, connection):
        """Send on ``connection``, a kept-alive one."""
        self.reused = True
        self._use(connection)
        self._send_request()

    def wait(self):
        """Wait for a connection (``fetcher.acquire`` calls ``reuse`` or ``connect``)."""
        self._deadline(self.client.read_timeout, "timed out waiting for a connection")

    def connect(self):
        """Send on a new connection, once the peer's host name is resolved (the connect
        timeout runs from now, so a resolver that does not answer times the fetch out)."""
        self.reused = False
        self._finish()
        self.state = _CONNECT
        self._deadline(self.client.connect_timeout, "connect timed out")
        self.fetcher.addresses(self.client.host, self.client.port, self._resolved)

    def _resolved(self, addresses):
        if self.result.done():                 # timed out while the name was looked up
            return
        if isinstance(addresses, OSError):
            self._fail(f"cannot resolve {self.client.host}: {addresses.strerror or addresses}")
            return
        self.addresses = list(addresses)
        self._connect()

    def _use(self, connection):
        self.connection = connection
        connection.handler = self
        self.received = bytearray()

    def _deadline(self, seconds, what):
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.fetcher.loop.call_later(seconds, lambda: self._fail(what))

    def _fail(self, reason):
        """Give up: PeerUnavailable, the connection closed."""
        self._finish()
        if self.connection is not None:
            self.connection.close()
        if not self.result.done():
            self.result.set_exception(PeerUnavailable(f"{self.client.url}: {reason}"))

    def _finish(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_event(self, events):
        try:
            if self.state == _CONNECT:
                self._connected()
            elif self.state == _HANDSHAKE:
                self._handshake()
            elif self.state == _SEND:
                self._send_more()
            else:
                self._receive()
        except OSError as exc:
            self._broken(exc)

    def _broken(self, exc):
        """The socket failed: on a reused connection before any answer, try a new one."""
        if self.reused and not self.received and not self.retried and self.state != _CONNECT:
            self._retry()
            return
        self._fail(exc.strerror or str(exc))

    def _retry(self):
        self.retried = True
        self.connection.close()
        self.connect()

    # -- connect and handshake -----------------------------------------------------------------

    def _connect(self):
        """Connect to the next address (the first that accepts wins)."""
        family, address = self.addresses.pop(0)
        self.state = _CONNECT
        try:
            connection = _Connection(self.fetcher, self.client.url, family)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
            return
        self._use(connection)
        if self.timer is None:
            self._deadline(self.client.connect_timeout, "connect timed out")
        code = connection.sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            self._connect_failed(code)
        elif code == 0:
            self._connected()

    def _connect_failed(self, code):
        if self.addresses:
            self.connection.close()
            self._connect()
            return
        self._fail(os.strerror(code))

    def _connected(self):
        code = self.connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._connect_failed(code)
            return
        if self.client.tls:
            self.connection.start_tls(self.client.tls_context, self.client.host)
            self.state = _HANDSHAKE
            self._handshake()
        else:
            self._send_request()

    def _handshake(self):
        connection = self.connection
        if connection.events & _IN and not self._read_ciphertext():
            return
        try:
            connection.tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLCertVerificationError as exc:
            log.error("peer %s refused: its TLS certificate does not verify against %s: %s",
                      self.client.url, trust_of(self.client.tls_ca), verify_problem(exc))
            self._fail(f"TLS certificate not trusted: {verify_problem(exc)}")
            return
        except ssl.SSLError as exc:
            self._fail(f"TLS handshake failed: {exc.reason or exc}")
            return
        self._queue(connection.outgoing.read())
        if not self._flush():
            return
        if done:
            self._send_request()
        else:
            connection.want(_IN)

    def _read_ciphertext(self):
        """Feed what the socket has into the TLS session; False if it had nothing.
        ConnectionResetError if the peer closed."""
        try:
            data = self.connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "the peer closed the connection")
        self.connection.incoming.write(data)
        return True

    # -- request and response ------------------------------------------------------------------

    def _send_request(self):
        client = self.client
        request = (f"GET {self.path} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\n"
                   f"{client.header_lines}\r\n").encode()
        self.state = _SEND
        self._deadline(client.read_timeout, "timed out")
        if self.connection.tls is not None:
            try:
                self.connection.tls.write(request)
            except ssl.SSLError as exc:
                self._broken(OSError(str(exc)))
                return
            request = self.connection.outgoing.read()
        self.pending = b""
        self._queue(request)
        try:
            if self._flush():
                self.state = _RECEIVE
                self.connection.want(_IN)
        except OSError as exc:
            self._broken(exc)

    def _queue(self, data):
        self.pending = self.pending + data if self.pending else data

    def _flush(self):
        """Send what is pending; True when all went, else wait for EPOLLOUT."""
        while self.pending:
            sent = self.connection.send_raw(self.pending)
            if not sent:
                self.connection.want(_OUT)
                return False
            self.pending = self.pending[sent:]
        return True

    def _send_more(self):
        if self._flush():
            self.state = _RECEIVE
            self.connection.want(_IN)

    def _receive(self):
        connection = self.connection
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._ended()
            return
        if connection.tls is not None:
            connection.incoming.write(data)
            data = bytearray()
            while True:
                try:
                    chunk = connection.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self._ended()
                    return
                except ssl.SSLError as exc:
                    self._fail(f"TLS error: {exc.reason or exc}")
                    return
                if not chunk:
                    break
                data += chunk
        self.received += data
        self._parse(closed=False)

    def _ended(self):
        """The peer closed: a response that runs until the close is complete now."""
        if not self.received:
            self._broken(ConnectionResetError(errno.ECONNRESET, "the peer closed the connection"))
            return
        self._parse(closed=True)

    def _parse(self, closed):
        """Answer once the response is whole (keep the connection if it may be reused)."""
        try:
            response = parse_response(self.received, closed)
        except ValueError as exc:
            self._fail(f"bad response: {exc}")
            return
        if response is None:
            if closed:
                self._fail("the peer closed the connection mid-response")
            return
        status, body, keep = response
        self._finish()
        if keep and not closed:
            self.fetcher.checkin(self.connection)
        else:
            self.connection.close()
        try:
            value = self.answer(status, body)
        except Exception as exc:          # NotFound, PeerError: what the status says
            self.result.set_exception(exc)
            return
        self.result.set_result(value)
