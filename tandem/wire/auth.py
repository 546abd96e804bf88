"""Shared-token auth: where the token comes from, how it is compared, when one is required."""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

ENV_VAR = "TANDEM_AUTH_TOKEN"
METADATA_KEY = "authorization"  # gRPC metadata: "Bearer <token>"


def load_token(token_file: str | Path | None = None, env: dict[str, str] | None = None) -> str | None:
    """The token from a file (whitespace stripped) or $TANDEM_AUTH_TOKEN; None when neither is set."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read auth token file {token_file}: {exc}") from exc
        if not token:
            raise ValueError(f"auth token file {token_file} is empty")
        return check_token(token)
    token = (os.environ if env is None else env).get(ENV_VAR, "").strip()
    return check_token(token) if token else None


def check_token(token: str) -> str:
    """Tokens travel in gRPC metadata, which carries printable ASCII only."""
    if not token or not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("an auth token must be non-empty printable ASCII without spaces")
    return token


def token_matches(expected: str | None, given: str | bytes | None) -> bool:
    """Constant-time comparison; with no expected token every request passes."""
    if expected is None:
        return True
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode()
    return hmac.compare_digest(expected.encode(), given)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def is_loopback(host: str) -> bool:
    """True only for addresses that cannot be reached from another machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, "0.0.0.0", "*", "": assume reachable


def check_listen(host: str, token: str | None, insecure: bool) -> None:
    """Listening beyond loopback without a token needs an explicit --insecure."""
    if token is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host or '*'} without an auth token: set {ENV_VAR} or "
            "--auth-token-file, listen on 127.0.0.1, or pass --insecure"
        )


def split_hostport(address: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"address {address!r} has no port (use HOST:PORT)")
        host, port = address, str(default_port)
    try:
        port_n = int(port)
    except ValueError:
        raise ValueError(f"bad port in address {address!r}") from None
    if not 0 <= port_n <= 65535:
        raise ValueError(f"port out of range in address {address!r}")
    return host.strip("[]") or "0.0.0.0", port_n
