"""A host's settings: ``Config``, and the command line of ``python -m shmcache.supervisor``
(and ``shmcache serve``) that makes it.

Every setting is one row of ``OPTIONS``: its ``Config`` field, its flag, its default (as
written on the command line), how the text becomes a value, its help and its check. The
argument parser, the ``Config`` dataclass and its defaults are all made from that table, so
a default is written once. ``parse_args`` returns ``Config(**values)``, by keyword.

This module imports nothing of the supervisor or the workers: both read ``Config``.
"""

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

from .arena import MAX_KEY_BYTES
from .discovery import parse_dns_target
from .peers import load_peer_list, normalize_url
from .tls import TlsFilesError, client_context, server_context
from .units import parse_size

PROG = "python -m shmcache.supervisor"
DESCRIPTION = "Run a shmcache host: a shared-memory arena and worker processes behind one port."


@dataclass(frozen=True)
class Option:
    """One setting. ``default`` is what the command line would say (``"256MiB"``, ``4``);
    ``convert`` turns that text into the ``Config`` value (a ValueError is a usage error);
    ``check`` says what is wrong with a converted value, or None. ``show_default`` appends
    ``(default ...)`` to the help."""
    name: str                       # the Config field (None: a command-line flag only)
    flag: str
    default: object = None
    help: str = None
    type: object = None             # argparse's type=, for numbers
    convert: object = None          # text -> value, after parsing
    check: object = None            # value -> error message or None
    action: str = None              # "store_true" for switches
    metavar: str = None
    choices: tuple = None
    env: str = None                 # the command line's default comes from this variable
    show_default: bool = True

    @property
    def value(self):
        """The Config default."""
        return self.convert(self.default) if self.convert else self.default

    def help_text(self):
        if self.show_default and self.default not in (None, "", False):
            shown = f"{self.default:g}" if isinstance(self.default, float) else self.default
            return f"{self.help} (default {shown})"
        return self.help


def _at_least_one(value):
    return None if value >= 1 else "--workers and --threads must be at least 1"


def _peer_list(text):
    return tuple(part for part in text.split(",") if part.strip())


def _token_problem(token):
    if token is not None and (not token.strip() or any(c.isspace() for c in token)):
        return "--token must be a non-empty word without spaces"
    return None


OPTIONS = (
    Option("workers", "--workers", 4, "worker processes", type=int,
           check=_at_least_one),
    Option("port", "--port", 8001, "TCP port", type=int,
           check=lambda port: None if 0 < port < 65536 else "--port must be 1..65535"),
    Option("host", "--host", "127.0.0.1", "address to bind"),
    Option("app", "--app", None,
           "MODULE:ATTR naming an iterable of shmcache.Group, or a callable returning one"),
    Option("origin", "--origin", None, "serve group 'origin', loading URL/<key> over HTTP"),
    Option("memory", "--memory", "256MiB", "arena size", convert=parse_size),
    Option("max_item_size", "--max-item-size", "1MiB", "largest value", convert=parse_size),
    Option("name", "--name", None, "segment name (default kcache-<port>)"),
    Option("base_path", "--base-path", "/_kcache/", "peer route prefix",
           check=lambda path: None if path.strip("/") else
           "--base-path must name a path, such as /_kcache/"),
    Option("threads", "--threads", 64,
           "threads per worker for loads and peer fetches; more misses queue", type=int,
           check=_at_least_one),
    Option("load_timeout", "--load-timeout", 30.0,
           "seconds a request waits for another process's load", type=float),
    Option("graceful_timeout", "--graceful-timeout", 30.0,
           "seconds workers get to finish requests when stopping", type=float),
    Option("warm_restart", "--warm-restart", False,
           "keep the segment (and its entries) at a clean stop, and re-attach a segment a "
           "previous supervisor kept that way at start; without it a clean stop removes the "
           "segment and a start discards any segment left under the name", action="store_true"),
    Option(None, "--unlink-on-stop", False,
           "deprecated: removing the segment at a clean stop is the default now",
           action="store_true"),
    Option("log_level", "--log-level", "info", "how much to log",
           choices=("debug", "info", "warning", "error")),
    Option("peers", "--peers", "", "URL,URL,... of every host (this one included)",
           convert=_peer_list),
    Option("peers_file", "--peers-file", None,
           "file of peer URLs (one per line), re-read when it changes (polled every "
           "--peers-refresh seconds) and on SIGHUP"),
    Option("peers_dns", "--peers-dns", None,
           "every address NAME resolves to (A and AAAA records) is a peer, on PORT (default "
           "--port); resolved again every --peers-refresh seconds", metavar="NAME[:PORT]"),
    Option("peers_refresh", "--peers-refresh", 5.0,
           "seconds between two lookups of --peers-dns and polls of --peers-file", type=float,
           check=lambda seconds: None if seconds > 0 else
           "--peers-refresh must be a positive number of seconds"),
    Option("self_url", "--self", None,
           "this host's URL among the peers (default http://<host>:<port>)"),
    Option("hot_fraction", "--hot-fraction", 0.1,
           "share of values fetched from owners kept here as hot copies", type=float,
           check=lambda share: None if 0 <= share <= 1 else
           "--hot-fraction must be between 0 and 1"),
    Option("peer_timeout", "--peer-timeout", 10.0, "seconds to wait for a peer's answer",
           type=float),
    Option("peer_connect_timeout", "--peer-connect-timeout", 0.5,
           "seconds to wait for a peer's connection", type=float),
    Option("token", "--token", None,
           "require 'Authorization: Bearer TOKEN' on writes and the peer route, and send it "
           "to peers (default: $SHMCACHE_TOKEN)", env="SHMCACHE_TOKEN", check=_token_problem),
    Option("token_reads", "--token-reads", False,
           "require the token on /cache/ reads, /stats and /metrics too", action="store_true"),
    Option("max_key_bytes", "--max-key-bytes", MAX_KEY_BYTES, "longest key accepted",
           type=int, check=lambda size: None if 1 <= size <= MAX_KEY_BYTES else
           f"--max-key-bytes must be 1..{MAX_KEY_BYTES}"),
    Option("access_log", "--access-log", False, "log one line per request",
           action="store_true"),
    Option("request_timeout", "--request-timeout", 10.0,
           "seconds a client may take to send a request's headers", type=float),
    Option("keepalive_timeout", "--keepalive-timeout", 75.0,
           "seconds an idle keep-alive connection is kept", type=float),
    Option("tls_cert", "--tls-cert", None,          # with tls_key: the front speaks HTTPS
           "serve HTTPS with this PEM certificate (chain); needs --tls-key", metavar="FILE"),
    Option("tls_key", "--tls-key", None, "the PEM private key of --tls-cert", metavar="FILE"),
    Option("tls_ca", "--tls-ca", None,              # verifies https:// peers (None: system CAs)
           "PEM CA bundle that https:// peers' certificates are verified against (default: "
           "the system's CA store); connect() clients use it too, unless told otherwise",
           metavar="FILE"),
)

FIELDS = {option.name: option for option in OPTIONS if option.name}


class _Settings:
    """What Config adds to its fields (the fields themselves come from OPTIONS)."""

    def __post_init__(self):
        if self.name is None:
            self.name = f"kcache-{self.port}"
        self.self_explicit = self.self_url is not None
        if self.self_url is None:
            host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
            self.self_url = f"{self.scheme}://{host}:{self.port}"

    @property
    def scheme(self):
        """What the front speaks, and so the scheme of this host's URL and of the peers
        discovered by name."""
        return "https" if self.tls_cert else "http"

    @property
    def clustered(self):
        """True when other hosts may share the keyspace."""
        return bool(self.peers or self.peers_file or self.peers_dns)


def _annotation(option):
    return object if option.value is None else type(option.value)


Config = dataclasses.make_dataclass(
    "Config", [(option.name, _annotation(option), dataclasses.field(default=option.value))
               for option in FIELDS.values()],
    bases=(_Settings,), namespace={"__module__": __name__})
Config.__doc__ = "A host's settings: one field per row of OPTIONS, with its default."


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    for option in OPTIONS:
        kwargs = {"help": option.help_text()}
        if option.name and option.flag.lstrip("-").replace("-", "_") != option.name:
            kwargs["dest"] = option.name
        if option.action:
            kwargs["action"] = option.action
        else:
            default = option.default
            if option.env:
                default = os.environ.get(option.env) or default
            kwargs["default"] = default
            for key in ("type", "metavar", "choices"):
                if getattr(option, key) is not None:
                    kwargs[key] = getattr(option, key)
        parser.add_argument(option.flag, **kwargs)
    return parser


def parse_args(argv=None):
    """The Config of a command line; exits 2 (argparse's usage error) if it is wrong."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    for option in FIELDS.values():
        value = getattr(args, option.name)
        if option.convert is not None:
            try:
                value = option.convert(value)
            except ValueError as exc:
                parser.error(str(exc))
        values[option.name] = value
    for option in FIELDS.values():
        problem = option.check and option.check(values[option.name])
        if problem:
            parser.error(problem)
    if values["token_reads"] and not values["token"]:
        parser.error("--token-reads needs --token (or $SHMCACHE_TOKEN)")
    if args.unlink_on_stop:
        if values["warm_restart"]:
            parser.error("--unlink-on-stop contradicts --warm-restart")
        print("warning: --unlink-on-stop is deprecated: a clean stop removes the segment "
              "unless --warm-restart is given", file=sys.stderr)
    values["tls_ca"] = check_tls(parser, args)
    try:
        load_peer_list(values["peers"], values["peers_file"])
        if values["peers_dns"]:
            parse_dns_target(values["peers_dns"], values["port"])
        if values["self_url"]:
            values["self_url"] = normalize_url(values["self_url"])
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    return Config(**values)


def check_tls(parser, args):
    """Exit 2 (a usage error) unless the TLS options go together and their files load, and
    --self has the scheme the front speaks. The CA file's absolute path: connect() clients
    of the segment read it from wherever they run."""
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together: give both, or neither")
    try:
        if args.tls_cert:
            server_context(args.tls_cert, args.tls_key)
        if args.tls_ca:
            client_context(args.tls_ca)
    except TlsFilesError as exc:
        parser.error(str(exc))
    scheme = "https" if args.tls_cert else "http"
    if args.self_url and not args.self_url.strip().startswith(f"{scheme}://"):
        parser.error(f"--self must be an {scheme}:// URL: this host's front speaks "
                     f"{'HTTPS (--tls-cert)' if args.tls_cert else 'plain HTTP (no --tls-cert)'}")
    return os.path.abspath(args.tls_ca) if args.tls_ca else None
