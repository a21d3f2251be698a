"""Whether a server can listen where it is told to, checked before the minutes of work that precede it.

uvicorn binds its socket only after the app's startup (the model load), and the demo indexes a
gallery first: a port already taken was reported seconds or minutes late, and the demo then waited
on whatever else answered there.
"""

from __future__ import annotations

import errno
import socket


def ensure_can_listen(host: str, port: int) -> None:
    """Raise OSError, in one line naming the address, when `host:port` cannot be bound (taken, or
    an address this machine lacks). Port 0 (any free port) always can."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        # as uvicorn binds: a port whose last connections are in TIME_WAIT is free to it
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            hint = "; another server is listening there (choose another with --port)" if taken else ""
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
