"""systemd readiness notification (the sd_notify protocol) without libsystemd.

The units in deploy/ are `Type=notify`: systemd waits until the service sends "READY=1" to the
datagram socket named by $NOTIFY_SOCKET, so dependants start only once the model is loaded and
the port is open. Outside systemd the variable is unset and this is a no-op.
"""

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1", "STATUS=...") to systemd.

    Returns True when the datagram was sent, False when not run by systemd or the socket is gone:
    a failed notification must not take a serving node down (systemd's start timeout reports it).
    """
    if not isinstance(state, str) or not state:
        raise ValueError(f"sd_notify state must be a non-empty string like 'READY=1', got {state!r}")
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace: a leading NUL byte instead of '@'
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %r to %r failed: %s", state, os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True
