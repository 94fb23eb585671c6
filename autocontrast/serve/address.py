"""The server's listening address: bound before anything slow starts, so a taken port is one clear error."""

from __future__ import annotations

import socket

from autocontrast.errors import ConfigurationError


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (the server then listens on it: no window for another process
    to take the port); an address that cannot be bound is a `ConfigurationError` naming it."""
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"port {port} must be within 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ConfigurationError(f"host {host!r} is not an address of this machine: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {err.strerror} (another server there? "
                                 "choose another --port)") from None
    return sock
