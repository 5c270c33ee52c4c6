"""A TCP proxy a test can cut, freeze, refuse and re-point: the network between a client and an edge."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    frozen: asyncio.Event = field(default_factory=asyncio.Event)  # set: bytes stop moving, sockets stay open
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                writer.transport.abort()  # a reset, as when a node dies
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<upstream>."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.refusing = False
        self.pipes: set[_Pipe] = set()
        self.accepted = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def point_to(self, upstream: int) -> None:
        """New connections go to `upstream`; open ones stay where they are."""
        self.upstream = upstream

    def cut(self) -> int:
        """Reset every open connection; returns how many."""
        pipes, self.pipes = self.pipes, set()
        for pipe in pipes:
            pipe.close()
        return len(pipes)

    def freeze(self) -> int:
        """Stop moving bytes on every open connection without closing it (a dead network path)."""
        for pipe in self.pipes:
            pipe.frozen.set()
        return len(self.pipes)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        pipe = _Pipe(writer, up_writer)
        self.pipes.add(pipe)
        pipe.tasks = [asyncio.create_task(self._copy(reader, up_writer, pipe)),
                      asyncio.create_task(self._copy(up_reader, writer, pipe))]

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pipe: _Pipe) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if pipe.frozen.is_set():
                    await asyncio.Event().wait()  # swallow everything from now on
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not pipe.frozen.is_set():
                self.pipes.discard(pipe)
                pipe.close()
