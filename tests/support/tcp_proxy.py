"""A small TCP proxy for fault tests: forward, delay, blackhole, reset.

Runs its own event loop in a daemon thread so synchronous tests can steer it:

    with TcpProxy(target_port) as proxy:     # listens on 127.0.0.1:proxy.port
        proxy.blackhole()                    # keep sockets open, drop all bytes (half-open peer)
        proxy.reset()                        # abort every connection (RST)
        proxy.delay(0.2)                     # add latency to every chunk
        proxy.forward()                      # back to normal

Only loopback addresses are ever used.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from typing import Any

_CHUNK = 65536


class TcpProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target_port> with injectable faults."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        assert target_host.startswith("127.") or target_host == "localhost", "loopback targets only"
        self.target = (target_host, target_port)
        self.port = 0
        self.mode = "forward"
        self.latency = 0.0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- faults ---------------------------------------------------------------------------

    def forward(self) -> None:
        self.mode, self.latency = "forward", 0.0

    def delay(self, seconds: float) -> None:
        self.mode, self.latency = "forward", seconds

    def blackhole(self) -> None:
        """Swallow every byte both ways and keep the sockets open: a peer that vanished."""
        self.mode = "blackhole"

    def refuse(self) -> None:
        """New connections are closed at once (the broker looks down)."""
        self.mode = "refuse"

    def reset(self) -> None:
        """Abort every open connection with a TCP RST (new ones are still accepted)."""
        self._call(self._reset())

    @property
    def connections(self) -> int:
        return len(self._pairs)

    # -- the loop side --------------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._reset()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _reset(self) -> None:
        for pair in list(self._pairs):
            for writer in pair:
                _abort(writer)
        self._pairs.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "refuse":
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        await asyncio.gather(self._pipe(reader, up_writer, pair), self._pipe(up_reader, writer, pair))
        self._pairs.discard(pair)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if self.mode == "blackhole":
                    continue  # swallowed: the other side never hears of it
                if self.latency:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # either side went away: the pump ends, the finally below closes the other
        finally:
            # The reading side ended (EOF or error): the peer is gone, drop the pair
            # (in blackhole mode too: only live peers are kept waiting).
            for side in pair:
                _abort(side)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), like a crashed peer or a cut cable."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
