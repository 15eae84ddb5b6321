"""The driver's one AMQP connection, kept up: connect, watch, reconnect with backoff.

``Link.open`` connects once (and fails loudly: a wrong URL or password should stop
the app at start, not loop). After that a supervisor task watches the connection.
When it drops, every listener is told (``link_down``: deliveries from the old
channels are now stale), then the supervisor reconnects with exponential backoff
and jitter between ``reconnect_delay`` and ``reconnect_max_delay`` for as long as
the driver is open, and tells every listener again (``link_up``: re-declare,
re-attach consumers). Callers that need the connection meanwhile wait for it, at
most ``timeout`` seconds (``connection_timeout``, default 15 s), then get a
retryable INTERNAL error: never a hang.

Half-open connections (the peer vanished without a FIN) are found by heartbeats:
with ``heartbeat: N`` the client sends a heartbeat every N/2 s and gives up after
``2 * (N + 1)`` s without any frame from the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any, Protocol

import aiormq
from aiormq.abc import AbstractChannel
from pamqp import commands as spec
from pamqp import encode
from yarl import URL

from conveyor import errors
from conveyor.drivers.amqp._errors import describe
from conveyor.drivers.options.amqp import AmqpOptions, AmqpTls

__all__ = ["Link", "LinkListener", "backoff_delays", "connect_error", "connection_url", "ssl_context"]

log = logging.getLogger("conveyor.drivers.amqp")

DEFAULT_HEARTBEAT = 30  # seconds, when neither the options nor the URL set one


class LinkListener(Protocol):
    """Something that holds channels on the link and must follow its state."""

    def link_down(self) -> None:
        """The connection is gone: every channel of it is dead (called on the loop, no await)."""

    async def link_up(self) -> None:
        """A new connection is up: re-create channels. Errors are logged, not raised."""


def backoff_delays(first: float, cap: float, rng: random.Random | None = None) -> Any:
    """Endless reconnect delays: exponential from ``first`` to ``cap``, with jitter.

    Each delay is drawn from [d/2, d] where d doubles every attempt (equal jitter):
    processes that lost the same broker do not all come back in the same instant,
    and none waits less than half the nominal delay.
    """
    rand = rng or random.Random()
    nominal = first
    while True:
        yield rand.uniform(nominal / 2, nominal)
        nominal = min(nominal * 2, cap)


class _Connection(aiormq.Connection):
    """aiormq's connection plus what it lacks: frame_max/channel_max and AMQPLAIN.

    aiormq answers ``connection.tune`` with the broker's own limits; we lower them to
    ``frame_size``/``channel_max`` when those are set (0 means "no limit" in AMQP).
    """

    # Two missed heartbeats, not aiormq's three: a half-open connection is found within
    # about two heartbeats.
    HEARTBEAT_GRACE_MULTIPLIER = 2

    def __init__(self, url: URL, *, frame_max: int | None, channel_max: int | None, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._want_frame_max = frame_max
        self._want_channel_max = channel_max

    async def _rpc(self, request: Any, writer: Any, frame_receiver: Any, wait_response: bool = True) -> Any:  # type: ignore[override]
        # aiormq declares _rpc static; an instance method lets us see our limits.
        frame = await aiormq.Connection._rpc(request, writer, frame_receiver, wait_response)
        if isinstance(frame, spec.Connection.Tune):
            frame.frame_max = _lower(frame.frame_max, self._want_frame_max)
            frame.channel_max = _lower(frame.channel_max, self._want_channel_max)
        return frame

    def _credentials_class(self, start_frame: spec.Connection.Start) -> Any:
        if self.url.query.get("auth", "").upper() != "AMQPLAIN":
            return super()._credentials_class(start_frame)
        if "AMQPLAIN" not in start_frame.mechanisms.split():
            raise aiormq.exceptions.AuthenticationError(start_frame.mechanisms, ["AMQPLAIN"])
        return _AmqplainMechanism


def _lower(offered: int, wanted: int | None) -> int:
    if not wanted:
        return offered
    return wanted if not offered else min(offered, wanted)


class _Amqplain:
    """The AMQPLAIN SASL response: a field table {LOGIN, PASSWORD} without its length."""

    def __init__(self, connection: aiormq.Connection) -> None:
        self.connection = connection

    def marshal(self) -> str:
        url = self.connection.url
        table = encode.field_table({"LOGIN": url.user or "guest", "PASSWORD": url.password or "guest"})
        # pamqp writes the response as UTF-8 text; the table is ASCII-safe only while
        # every byte stays below 0x80 (ASCII credentials shorter than 128 bytes).
        raw = table[4:]
        if any(byte >= 0x80 for byte in raw):
            raise aiormq.exceptions.AuthenticationError(
                "AMQPLAIN", ["AMQPLAIN supports ASCII credentials shorter than 128 bytes only; use PLAIN"]
            )
        return raw.decode("ascii")


class _AmqplainMechanism:
    name = "AMQPLAIN"
    value = _Amqplain


# -- options -> connection arguments ------------------------------------------------------------


def connection_url(options: AmqpOptions) -> URL:
    """The broker URL with ``vhost``, ``heartbeat`` and ``auth_mechanism`` applied."""
    url = URL(options.url)
    if options.tls is not None and options.tls.enabled and url.scheme == "amqp":
        url = url.with_scheme("amqps").with_port(url.explicit_port or 5671)
    if options.vhost is not None:
        url = url.with_path("/" + options.vhost.replace("/", "%2F"), encoded=True)
    query = dict(url.query)
    heartbeat = options.heartbeat
    if heartbeat is not None:
        query["heartbeat"] = str(math.ceil(heartbeat)) if heartbeat > 0 else "0"
    elif "heartbeat" not in query:
        query["heartbeat"] = str(DEFAULT_HEARTBEAT)
    if options.auth_mechanism:
        query["auth"] = options.auth_mechanism
    return url.with_query(query)


def ssl_context(tls: AmqpTls | None, url: URL) -> ssl.SSLContext | None:
    """An SSL context from the ``tls`` block: PEM given inline, by file, or in env vars."""
    if url.scheme != "amqps":  # connection_url() already switched to amqps when tls.enabled
        return None
    tls = tls or AmqpTls()
    ca = _pem(tls, "ca")
    try:
        context = ssl.create_default_context(
            cafile=ca if ca and not _is_pem(ca) else None, cadata=ca if ca and _is_pem(ca) else None
        )
    except OSError as exc:  # ssl.SSLError included; ssl's errors name no file
        raise _unloadable(tls, {"ca": ca}, exc) from None
    cert, key = _pem(tls, "cert"), _pem(tls, "key")
    if cert:
        try:
            _load_chain(context, cert, key)
        except OSError as exc:
            raise _unloadable(tls, {"cert": cert, "key": key}, exc) from None
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _unloadable(tls: AmqpTls, values: Mapping[str, str | None], exc: OSError) -> errors.Error:
    """INVALID naming the ``tls`` fields and files that ssl could not load (never the PEM itself)."""
    sources = []
    for name, value in values.items():
        if value is None:
            continue
        env_name = getattr(tls, f"{name}_env")
        where = f"${env_name}" if env_name else "inline PEM" if _is_pem(value) else value
        sources.append(f"tls.{name}{'_env' if env_name else ''} ({where})")
    return errors.invalid(f"cannot load {' and '.join(sources)}: {exc}")


def _is_pem(text: str) -> bool:
    return "-----BEGIN" in text


def _pem(tls: AmqpTls, name: str) -> str | None:
    """The PEM text or file path of ``name``; ``<name>_env`` names a variable holding PEM."""
    env_name: str | None = getattr(tls, f"{name}_env")
    if env_name:
        value = os.environ.get(env_name)
        if not value:
            raise errors.invalid(f"tls.{name}_env: environment variable {env_name} is not set or empty")
        return value
    found: str | None = getattr(tls, name)
    return found or None


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    # ssl only loads certificates from files: inline PEM goes through a private
    # temporary file that is deleted as soon as it has been read.
    with contextlib.ExitStack() as stack:
        paths = [_as_file(stack, text) if text and _is_pem(text) else text for text in (cert, key)]
        context.load_cert_chain(paths[0] or "", paths[1])


def _as_file(stack: contextlib.ExitStack, pem: str) -> str:
    handle = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".pem"))  # noqa: SIM115 - the stack closes it
    os.chmod(handle.name, 0o600)
    handle.write(pem)
    handle.flush()
    return handle.name


# -- the link -------------------------------------------------------------------------------------


class Link:
    """One connection, reconnected for as long as the driver is open."""

    def __init__(self, options: AmqpOptions, *, name: str) -> None:
        self._options = options
        self._url = connection_url(options)
        self._safe_url = str(self._url.with_password("***") if self._url.password else self._url)
        self._name = name
        self.timeout = options.connection_timeout
        self._conn: aiormq.Connection | None = None
        self._up = asyncio.Event()
        self._closed = False
        self._supervisor: asyncio.Task[None] | None = None
        self._listeners: list[LinkListener] = []
        self.generation = 0  # bumped on every new connection
        self.last_error = ""

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (a property: it changes while we await)."""
        return self._closed

    @property
    def is_up(self) -> bool:
        return self._up.is_set() and self._conn is not None and not self._conn.is_closed

    def add_listener(self, listener: LinkListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: LinkListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def open(self) -> None:
        """Connect (once, no retries).

        Raises INTERNAL (retryable) when the broker is unreachable, and a
        non-retryable error when the broker or TLS definitely refused this client
        (see :func:`connect_error`): trying again unchanged cannot help.
        """
        try:
            await self._connect()
        except errors.Error:
            raise
        except Exception as exc:
            raise connect_error(exc, self._safe_url) from None
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"conveyor-amqp-link:{self._name}"
        )

    async def _connect(self) -> None:
        opts = self._options
        tls = opts.tls
        kwargs: dict[str, Any] = {}
        if tls is not None and tls.server_name and self._url.scheme == "amqps":  # plain TCP refuses it
            kwargs["server_hostname"] = tls.server_name
        properties = {"connection_name": opts.connection_name or self._name}
        conn = _Connection(
            self._url,
            frame_max=opts.frame_size,
            channel_max=opts.channel_max,
            context=ssl_context(tls, self._url),
            client_properties=properties,
            **kwargs,
        )
        try:
            async with asyncio.timeout(self.timeout):
                await conn.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self._conn = conn
        self.generation += 1
        self._up.set()
        log.info("connected to %s (%s)", self._safe_url, self._name)

    async def close(self) -> None:
        """Close for good: stop reconnecting, close the connection. Idempotent."""
        self._closed = True
        self._up.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), self.timeout)

    async def connection(self) -> aiormq.Connection:
        """The live connection; waits up to ``timeout`` for a reconnect, then INTERNAL retryable."""
        if self._closed:
            raise errors.internal("the AMQP driver is closed", retryable=False)
        if not self.is_up:
            try:
                async with asyncio.timeout(self.timeout):
                    while not self.is_up:
                        await self._up.wait()
                        await asyncio.sleep(0)  # let a closing connection finish its callbacks
            except TimeoutError:
                raise self.unreachable() from None
        assert self._conn is not None
        return self._conn

    def unreachable(self) -> errors.Error:
        """The INTERNAL (retryable) error for "no connection within the timeout"."""
        return errors.internal(
            f"the AMQP broker at {self._safe_url} is unreachable "
            f"(no connection for {self.timeout:g}s; last error: {self.last_error or 'none'})",
            reason="unreachable",
            retryable=True,
        )

    async def channel(self, *, confirms: bool) -> AbstractChannel:
        """A new channel on the live connection (publisher confirms on or off)."""
        conn = await self.connection()
        try:
            async with asyncio.timeout(self.timeout):
                return await conn.channel(publisher_confirms=confirms)
        except Exception as exc:
            raise errors.internal(f"cannot open an AMQP channel: {describe(exc)}", retryable=True) from None

    # -- supervision ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while not self._closed:
            conn = self._conn
            assert conn is not None
            # asyncio.wait never raises the connection's own error (or cancellation).
            await asyncio.wait({conn.closing})
            if self.closed:
                return
            self._up.clear()
            self.last_error = _close_reason(conn)
            log.warning("lost the connection to %s: %s; reconnecting", self._safe_url, self.last_error)
            for listener in list(self._listeners):
                listener.link_down()
            await self._reconnect()
            for listener in list(self._listeners):
                await listener.link_up()

    async def _reconnect(self) -> None:
        delays = backoff_delays(self._options.reconnect_delay, self._options.reconnect_max_delay)
        attempt = 0
        while not self._closed:
            attempt += 1
            await asyncio.sleep(next(delays))
            try:
                await self._connect()
            except Exception as exc:
                self.last_error = describe(exc)
                log.warning("reconnect attempt %d to %s failed: %s", attempt, self._safe_url, self.last_error)
                continue
            log.info("reconnected to %s after %d attempt(s)", self._safe_url, attempt)
            return


# The broker's TLS alerts that mean "your certificate is refused" (not a network failure).
_REFUSED_CERTIFICATE = ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED")


def connect_error(exc: BaseException, safe_url: str) -> errors.Error:
    """The error for a failed first connection.

    A refused login (``ACCESS_REFUSED``, an authentication mechanism the broker does
    not offer) is PERMISSION_DENIED, a broker certificate that does not verify or a
    client certificate the broker refuses is INTERNAL; neither is retryable, so an app
    does not keep trying a wrong password. Anything else (refused or reset
    connections, timeouts) is INTERNAL and retryable: the broker may be starting.
    """
    text = f"cannot connect to the AMQP broker at {safe_url}: {describe(exc)}"
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError):
        # ProbableAuthenticationError is aiormq's name for the broker's connection.close 403.
        return errors.permission_denied(text, url=safe_url, reason="auth")
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return errors.internal(text, url=safe_url, reason="tls", retryable=False)
    if isinstance(cause, ssl.SSLError) and any(alert in str(cause) for alert in _REFUSED_CERTIFICATE):
        return errors.internal(text, url=safe_url, reason="tls", retryable=False)
    return errors.internal(text, url=safe_url, retryable=True)


def _close_reason(conn: aiormq.Connection) -> str:
    closing = conn.closing
    if closing.done() and not closing.cancelled():
        exc = closing.exception()
        if exc is not None:
            return describe(exc)
    return "connection closed"
