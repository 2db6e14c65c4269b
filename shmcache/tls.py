"""TLS: every SSLContext shmcache makes, and one server-side TLS connection for the epoll loop.

Three roles, one module:

    the front     ``server_context(cert, key)``: --tls-cert/--tls-key, TLS 1.2 or later, no
                  renegotiation. Each worker makes its own after fork.
    peers         ``client_context(ca)``: a peer given as ``https://`` is verified against
                  --tls-ca, or the system's store without it, for the host name of its URL.
    connect()     the same verification, for the name the supervisor recorded in the segment
                  (the host of its --self URL: the name peers reach it by) and against the
                  CA file it recorded (its --tls-ca), both overridable per client.

The loop does no blocking TLS: ``ServerSession`` runs OpenSSL over memory buffers. The loop
reads ciphertext from the socket and feeds it in, and sends whatever ciphertext comes out
through its ordinary output buffer; a handshake step that wants more input is simply
waiting for the next readable event (SSLWantReadError), and one that "wants to write" has
put its bytes into the outgoing buffer, which the loop flushes like any answer (with
EPOLLOUT when the socket is full). So neither ever blocks the loop.
"""

import http.client
import ssl

TLS_RECORD = 0x16           # first byte of a TLS handshake record: anything else is not TLS
MAX_RECORD = 16384          # plaintext bytes in one TLS record, at most


class NotTls(Exception):
    """A connection's first byte is not a TLS handshake record: a plain HTTP client."""


class TlsFilesError(ValueError):
    """A certificate, key or CA file cannot be read or is not what it should be."""


def server_context(cert, key):
    """The front's context. TlsFilesError says which file is wrong and why."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsFilesError(f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate "
                            f"(chain) and its private key: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsFilesError(f"cannot read --tls-cert {cert} or --tls-key {key}: "
                            f"{_file_problem(exc)}") from None
    return context


def client_context(ca=None):
    """A context that verifies servers (certificate and host name) against the PEM bundle
    ``ca``, or the system's store when ``ca`` is None."""
    try:
        return ssl.create_default_context(cafile=ca)
    except ssl.SSLError as exc:
        raise TlsFilesError(f"CA file {ca} holds no PEM certificate: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsFilesError(f"cannot read CA file {ca}: {_file_problem(exc)}") from None


def _file_problem(exc):
    return f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"


def trust_of(ca):
    """How a context from ``client_context(ca)`` decides, for messages."""
    return f"the CA file {ca}" if ca else "the system's CA store"


def verify_problem(exc):
    """The reason in a certificate verification failure, without OpenSSL's wrapping."""
    return getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)


class NamedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPSConnection to ``host`` that verifies the certificate for ``server_name``: a
    local front is reached at 127.0.0.1, but its certificate names the host's DNS name."""

    def __init__(self, host, port, server_name=None, **kwargs):
        super().__init__(host, port, **kwargs)
        self.server_name = server_name or host

    def connect(self):
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.server_name)


class ServerSession:
    """The server side of one TLS connection over memory buffers (see the module's doc)."""
    __slots__ = ("_tls", "_incoming", "_outgoing", "established", "_started")

    def __init__(self, context):
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False
        self._started = False

    def receive(self, data):
        """Feed ciphertext; the plaintext it completes (b"" while the handshake goes on or a
        record is partial). EOFError when the client said close_notify; ssl.SSLError when
        what it sent is not acceptable TLS (or its handshake failed); NotTls when its very
        first byte shows it is no TLS client at all."""
        if not self._started:
            if data[0] != TLS_RECORD:
                raise NotTls()
            self._started = True
        self._incoming.write(data)
        if not self.established:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.established = True
        data = self._read()
        if data and (self._incoming.pending or self._tls.pending()):
            chunks = [data]                    # more than one record arrived
            while chunk := self._read():
                chunks.append(chunk)
            data = b"".join(chunks)
        return data

    def _read(self):
        """One record's plaintext, or b"" if no whole record is there. (Reading only while
        ciphertext is pending spares a request its SSLWantReadError, a third of its cost.)"""
        try:
            return self._tls.read(MAX_RECORD)
        except ssl.SSLWantReadError:
            return b""
        except ssl.SSLZeroReturnError:
            raise EOFError("the client closed the TLS session") from None

    def encrypt(self, data):
        """``data`` as the ciphertext to send."""
        self._tls.write(data)
        return self._outgoing.read()

    def outgoing(self):
        """Ciphertext the session produced on its own (handshake messages, tickets)."""
        return self._outgoing.read()
