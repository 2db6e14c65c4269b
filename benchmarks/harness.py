"""What the benchmarks share: free ports, starting supervisors, waiting for them."""

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + HERE}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(port, path="/healthz", timeout=60, context=None):
    """Until GET ``path`` answers 200 (over HTTPS with the SSLContext ``context``);
    RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = connect_http("127.0.0.1", port, timeout=2, context=context)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers GET {path} on port {port}")


def connect_http(host, port, timeout=None, context=None):
    """An HTTPConnection, or an HTTPSConnection with the SSLContext ``context``."""
    if context is None:
        return http.client.HTTPConnection(host, port, timeout=timeout)
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)


def start_supervisor(app, workers=4, memory="64MiB", extra=(), port=None, context=None,
                     env=None):
    """(process, port, segment name) of a supervisor serving ``app``; it removes its segment
    when stopped with SIGTERM. ``context``: the SSLContext to reach it with when ``extra``
    makes it serve HTTPS. ``env``: more environment variables for it."""
    port = port or free_port()
    name = f"kcache-bench-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmcache.supervisor", "--workers", str(workers), "--port", str(port),
         "--name", name, "--memory", memory, "--app", app,
         "--log-level", "warning", *extra], env={**ENV, **(env or {})})
    wait_http(port, context=context)
    return proc, port, name


def wait_for_socket(path, timeout=10):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not create {path}")
        time.sleep(0.01)


def start_memcached(sock):
    """A memcached process listening on the unix socket ``sock``, or the reason why not."""
    binary = shutil.which("memcached")
    if not binary:
        return None, "memcached is not installed (apt-get install memcached)"
    server = subprocess.Popen([binary, "-s", sock, "-m", "512", "-u", "root", "-t", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(sock)
    return server, None


def start_redis(sock):
    """A redis-server process listening on the unix socket ``sock`` only, or the reason."""
    binary = shutil.which("redis-server")
    if not binary:
        return None, "redis-server is not installed (apt-get install redis-server)"
    server = subprocess.Popen([binary, "--port", "0", "--unixsocket", sock, "--save", "",
                               "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(sock)
    return server, None


def stop(server):
    server.terminate()
    server.wait()
