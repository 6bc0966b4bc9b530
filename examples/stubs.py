"""Tiny stand-ins for the services the example app needs but this machine lacks.

``scanner``: a virus-scanner stand-in in the spirit of clamd's INSTREAM: the client
sends the file and closes its side; the stub answers ``OK`` (or ``FOUND`` when
the file contains the EICAR marker). ``turn``: a TCP listener standing for a
TURN server (coturn); the app only checks that it accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib

EICAR_MARKER = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE"
MAX_SCAN_BYTES = 10 * 1024 * 1024


async def _scan(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        data = await asyncio.wait_for(reader.read(MAX_SCAN_BYTES), timeout=5)
        writer.write(b"FOUND\n" if EICAR_MARKER in data else b"OK\n")
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def start(kind: str, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start the ``scanner`` or ``turn`` stub; its port is ``server.sockets[0].getsockname()[1]``."""
    handler = {"scanner": _scan, "turn": _accept}[kind]
    return await asyncio.start_server(handler, host, port)


async def main() -> None:
    """Run both stubs on their usual ports (3310, 3478) until interrupted."""
    servers = [await start("scanner", port=3310), await start("turn", port=3478)]
    print("scanner stub on 127.0.0.1:3310, TURN stub on 127.0.0.1:3478; Ctrl-C to stop")
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
