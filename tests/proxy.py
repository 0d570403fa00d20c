"""A TCP proxy on loopback, in its own thread, between a client and a real server: a slow replica (each chunk the
server sends held ``delay_s``) or, once ``hung`` is set, a hung one (connections open and accepted, nothing
forwarded either way, nothing answered)."""

from __future__ import annotations

import asyncio
import threading


class Proxy:
    def __init__(self, port: int, delay_s: float = 0.0):
        self.target, self.delay_s = port, delay_s
        self.hung = False
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result()
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(reader, server_writer, 0.0), self._pipe(server_reader, writer, self.delay_s))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay_s:
                    await asyncio.sleep(delay_s)
                if self.hung:  # dropped
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:  # the connections still open
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
