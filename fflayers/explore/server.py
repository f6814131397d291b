"""Serving the explorer: :func:`serve` (blocking, what ``fflayers explore`` runs) and
:func:`serve_in_thread` (a context manager for tests, benchmarks and the demo)."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fflayers.core import InputError
from fflayers.explore.app import create_app
from fflayers.explore.session import Explorer

__all__ = ["DEFAULT_PORT", "is_loopback", "serve", "serve_in_thread"]

DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _config(explorer: Explorer, host: str, port: int, token: str | None, log_level: str):
    import uvicorn

    return uvicorn.Config(create_app(explorer, token), host=host, port=port, log_level=log_level,
                          access_log=False, lifespan="off")


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise InputError(f"cannot listen on {host}:{port} ({err.strerror}); pass another "
                             "--port") from None


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          log_level: str = "warning") -> None:
    """Serve until interrupted. A host other than loopback needs a token (a random one when None)."""
    import uvicorn

    if not is_loopback(host) and token is None:
        token = secrets.token_urlsafe(18)
    _check_port(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"fflayers explore: {explorer.name} at {url}  (Ctrl+C stops)", flush=True)
    uvicorn.Server(_config(explorer, host, port, token, log_level)).run()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(explorer: Explorer, host: str = "127.0.0.1", port: int | None = None,
                    token: str | None = None, timeout_s: float = 30.0) -> Iterator[str]:
    """Serve in a background thread; yields the base URL (``http://host:port``) once it accepts requests."""
    import uvicorn

    port = port or _free_port(host)
    server = uvicorn.Server(_config(explorer, host, port, token, "warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="fflayers-explore")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise InputError(f"the explorer did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
