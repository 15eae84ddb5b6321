"""The HTTP endpoint of ``/metrics``, ``/healthz`` and ``/readyz``: a small threaded server.

The standard library's ``socketserver`` with ``http.server``'s request handler, one
daemon thread per request, in a daemon thread of its own (see
docs/dependencies.md#http-the-standard-librarys-httpserver for why no web framework). What to answer comes
from a :class:`Source` (the app's :class:`~conveyor.observe.observer.Observer`, or a
prefork supervisor's :class:`~conveyor.observe.workers.WorkersSource`); a request
thread never runs code on an app's event loop itself: a source that needs the loop
hands it a short function and waits with a timeout.

The endpoint listens on TCP (loopback by default) or on a Unix socket (the private
link between a prefork worker and its supervisor). A port that cannot be bound is an
INVALID :class:`~conveyor.errors.Error` naming the address and why.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import os
import socket
import socketserver
import stat
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from conveyor import errors

__all__ = [
    "Endpoint",
    "Listen",
    "Request",
    "Response",
    "Source",
    "exposition",
    "fetch_unix",
    "json_response",
]

log = logging.getLogger("conveyor.observe")

REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request


@dataclass(frozen=True, slots=True)
class Listen:
    """Where an endpoint listens: ``host``:``port`` (port 0: any free port), or a Unix
    socket at ``path``."""

    host: str = "127.0.0.1"
    port: int = 0
    path: str | None = None

    def __post_init__(self) -> None:
        if self.path is None and (
            isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535
        ):
            raise errors.invalid(f"metrics port must be a whole number from 0 to 65535, got {self.port!r}")
        if self.path is None and (not isinstance(self.host, str) or not self.host):
            raise errors.invalid(f"metrics host must be a host name or address, got {self.host!r}")


@dataclass(frozen=True, slots=True)
class Request:
    path: str
    query: dict[str, str] = field(default_factory=dict)
    accept: str = ""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes


class Source(Protocol):
    """What an endpoint serves: answers one request (called in a request thread)."""

    def respond(self, request: Request) -> Response: ...


def json_response(status: int, data: Any) -> Response:
    body = json.dumps(data, indent=2, sort_keys=False).encode() + b"\n"
    return Response(status, "application/json", body)


def not_found(path: str) -> Response:
    return Response(404, "text/plain; charset=utf-8", f"no such page: {path}\n".encode())


class _Families:
    """A collector over a fixed list of families (what the exposition helpers read)."""

    def __init__(self, found: list[Metric]) -> None:
        self._found = found

    def collect(self) -> list[Metric]:
        return self._found


def exposition(found: list[Metric], accept: str) -> Response:
    """``found`` in the format the client asked for (Prometheus text or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept)
    return Response(200, content_type, encoder(_Families(found)))


# -- the server -------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        request = Request(url.path, dict(parse_qsl(url.query)), self.headers.get("Accept", ""))
        source: Source = self.server.source  # type: ignore[attr-defined]
        try:
            response = source.respond(request)
        except Exception as exc:
            log.exception("answering %s failed", url.path)
            response = Response(500, "text/plain; charset=utf-8", f"internal error: {exc}\n".encode())
        with contextlib.suppress(OSError):  # the client went away
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(response.body)

    def version_string(self) -> str:
        return "conveyor"  # the Server header: no Python version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics endpoint: " + format, *args)


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart binds again at once (TIME_WAIT), never beside a listener

    def __init__(self, address: tuple[str, int], family: int, source: Source) -> None:
        self.address_family = family
        self.source = source
        super().__init__(address, _Handler)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, source: Source) -> None:
        self.source = source
        super().__init__(path, _Handler)


def _family(host: str, port: int) -> int:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise errors.invalid(f"cannot serve metrics on {host}:{port}: unknown host ({exc})") from None
    return int(infos[0][0])


class Endpoint:
    """A server answering from ``source`` on ``listen``; owned by whoever starts it.

    :meth:`start` binds (INVALID on failure) and starts the serving thread;
    :meth:`close` stops it and waits for the thread (it blocks for up to
    ``POLL`` seconds: call it off an event loop).
    """

    POLL = 0.1  # seconds between the serving thread's checks for a shutdown

    def __init__(self, listen: Listen, source: Source) -> None:
        self.listen = listen
        self.source = source
        self._server: _TcpServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | str | None:
        """``(host, port)`` as bound, or the Unix socket's path; None when not serving."""
        server = self._server
        if server is None:
            return None
        if isinstance(server, _UnixServer):
            return str(server.server_address)
        host, port = server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        address = self.address
        if address is None or isinstance(address, str):
            return f"unix:{address}"
        host, port = address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        if self._server is not None:
            return
        listen = self.listen
        try:
            if listen.path is not None:
                _remove_stale_socket(listen.path)
                self._server = _UnixServer(listen.path, self.source)
            else:
                family = _family(listen.host, listen.port)
                self._server = _TcpServer((listen.host, listen.port), family, self.source)
        except OSError as exc:
            raise _bind_error(listen, exc) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": self.POLL},
            name="conveyor-metrics",
            daemon=True,
        )
        self._thread.start()
        # a prefork worker's private socket is its supervisor's business: not worth an INFO line
        level = logging.DEBUG if listen.path is not None else logging.INFO
        log.log(level, "serving /metrics, /healthz and /readyz on %s", self.url)

    def close(self) -> None:
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        if isinstance(server, _UnixServer) and self.listen.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.listen.path)


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a process that died would make the bind fail."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def _bind_error(listen: Listen, exc: OSError) -> errors.Error:
    where = listen.path if listen.path is not None else f"{listen.host}:{listen.port}"
    if exc.errno == errno.EADDRINUSE:
        why = "the address is already in use (another process listens there); choose another port"
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges); choose a port of 1024 or more"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "this machine has no such address"
    else:
        why = exc.strerror or str(exc)
    return errors.invalid(
        f"cannot serve metrics on {where}: {why}",
        host=listen.host,
        port=listen.port,
        path=listen.path,
        errno=exc.errno,
    )


# -- the client side (a prefork supervisor asking its workers) --------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def fetch_unix(path: str, target: str, timeout: float) -> tuple[int, bytes]:
    """GET ``target`` from the endpoint on the Unix socket ``path``: status and body.

    Raises OSError (connection refused, timeout, ...) and ``http.client.HTTPException``.
    """
    conn = _UnixConnection(path, timeout)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
