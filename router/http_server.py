"""Serving the HTTP door (router/http_app.py) with uvicorn on the router's own event loop.

The socket is bound here, before uvicorn starts: port 0 works (the bound port is `HttpServer.port`), a
taken port fails at start with the flag to change, and the socket is declared IPPROTO_TCP so that
asyncio turns Nagle off on every accepted connection. uvicorn's signal handlers are switched off: the
host process owns SIGINT and SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

import uvicorn

from router.http_app import HttpDoor
from router.security import TlsFiles


class _Server(uvicorn.Server):
    """uvicorn on a loop someone else runs: the host process owns SIGINT / SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The door's app served by uvicorn on host:port (0: any free port) in the running event loop."""

    def __init__(self, door: HttpDoor, host: str = "127.0.0.1", port: int = 8000, tls: TlsFiles | None = None) -> None:
        self.door = door
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP;
        # with it on, a stream's first chunk after the headers waited ~40 ms for a delayed ACK on a
        # kept-alive connection (benchmarks/http_overhead.py measured TTFT +40 ms before this)
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise OSError(
                f"cannot bind the HTTP server to {host}:{port} ({exc.strerror}); choose another "
                "--http-port, or --no-http"
            ) from None
        self.sock.listen(2048)
        self.port = self.sock.getsockname()[1]
        kwargs: dict[str, Any] = {}
        if tls is not None:
            kwargs = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
            if tls.client_ca:
                kwargs |= {"ssl_ca_certs": tls.client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            door.app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=5, **kwargs
        )
        self.server = _Server(config)
        self._task: asyncio.Task | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.server.config.is_ssl else "http"

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http-door")
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self.sock.close()
