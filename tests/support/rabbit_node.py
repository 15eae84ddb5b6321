"""RabbitMQ helpers for tests: a suite-owned broker node, and queue cleanup.

``RabbitNode`` runs a private RabbitMQ node for fault tests (restart it, stop it)
without touching the shared broker on 5672: its own node name, AMQP port and
distribution port on 127.0.0.1, its own data and log directories under a temporary
directory, an empty environment file so /etc/rabbitmq/rabbitmq-env.conf (which names
the shared node) is not read, and its own Erlang cookie (HOME points into the
temporary directory). It is started with ``rabbitmq-server`` and stopped with
``rabbitmqctl stop``; stopping and starting again keeps its data (durable queues
and persistent messages survive, as on a real broker restart).

A node may also get a TLS (amqps) listener on another loopback port (``tls=``, see
:class:`TlsListener`), plugins to enable (``plugins=``, through its own
enabled_plugins file) and extra ``rabbitmq.conf`` lines (``config=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def rabbit_available() -> str | None:
    """Why a private node cannot be started here, or None when it can."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        found = shutil.which("rabbitmq-server")
        if found is None:
            return "rabbitmq-server is not installed"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TlsListener:
    """PEM files for a node's TLS listener; client certificates are verified against ``cacertfile``."""

    cacertfile: Path
    certfile: Path
    keyfile: Path
    fail_if_no_peer_cert: bool = False

    def config(self, port: int) -> list[str]:
        return [
            f"listeners.ssl.1 = 127.0.0.1:{port}",
            f"ssl_options.cacertfile = {self.cacertfile}",
            f"ssl_options.certfile = {self.certfile}",
            f"ssl_options.keyfile = {self.keyfile}",
            "ssl_options.verify = verify_peer",
            f"ssl_options.fail_if_no_peer_cert = {str(self.fail_if_no_peer_cert).lower()}",
        ]


class RabbitNode:
    """A private RabbitMQ node on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        base: Path,
        name: str = "conveyor-test",
        *,
        tls: TlsListener | None = None,
        plugins: Sequence[str] = (),
        config: Sequence[str] = (),
    ) -> None:
        self.base = base
        self.port = free_port()
        self.dist_port = free_port()
        self.tls_port: int | None = free_port() if tls is not None else None
        self.nodename = f"{name}-{self.port}@localhost"
        self._tls = tls
        self._plugins = tuple(plugins)
        self._config = tuple(config)
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepare()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _prepare(self) -> None:
        for sub in ("mnesia", "log", "home"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "env.conf").write_text("")
        lines = ["loopback_users = none", *self._config]
        if self._tls is not None and self.tls_port is not None:
            lines += self._tls.config(self.tls_port)
        (self.base / "rabbitmq.conf").write_text("".join(line + "\n" for line in lines))
        (self.base / "enabled_plugins").write_text(f"[{','.join(self._plugins)}].\n")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        base = self.base
        env.update(
            HOME=str(base / "home"),
            RABBITMQ_CONF_ENV_FILE=str(base / "env.conf"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            # keep Erlang distribution on loopback too
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _bin(self, tool: str) -> str:
        path = RABBIT_BIN / tool
        return str(path) if path.exists() else tool

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and wait until it accepts AMQP connections (and TLS ones, if configured)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        out = open(self.base / "server.out", "ab")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            [self._bin("rabbitmq-server")],
            env=self.env(),
            cwd=self.base,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while not (self._amqp_ready() and (self.tls_port is None or port_open(self.tls_port))):
            if self._proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self._proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"rabbitmq-server did not start within {timeout}s: {self.tail()}")
            time.sleep(0.2)

    def _amqp_ready(self) -> bool:
        """True once the broker answers the AMQP protocol header (not just accepts TCP)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                sock.settimeout(2)
                return sock.recv(1) == b"\x01"  # a method frame: connection.start
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``); data is kept for the next start."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            subprocess.run(
                [self._bin("rabbitmqctl"), "-n", self.nodename, "stop"],
                env=self.env(),
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the node's whole process group (beam and its helpers)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        result = subprocess.run(
            [self._bin("rabbitmqctl"), "-n", self.nodename, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return result.stdout

    def tail(self, lines: int = 15) -> str:
        path = self.base / "server.out"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# -- deleting test queues --------------------------------------------------------------------


def delete_queues(url: str, names: Iterable[str], timeout: float = 10.0) -> None:
    """Delete ``names`` from the broker at ``url``; best effort, bounded, from any thread.

    Runs its own event loop in a helper thread, so it is safe to call while another
    loop runs in the calling thread (or during garbage collection).
    """
    wanted = sorted(set(names))
    if not wanted:
        return
    thread = threading.Thread(target=lambda: asyncio.run(_delete(url, wanted, timeout)), daemon=True)
    thread.start()
    thread.join(timeout + 1)


async def _delete(url: str, names: list[str], timeout: float) -> None:
    import aiormq

    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            conn = await aiormq.connect(url)
            try:
                channel = await conn.channel()
                for name in names:
                    await channel.queue_delete(name)
            finally:
                await conn.close()
