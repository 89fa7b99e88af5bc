"""HTTP to TorchServe over TCP or a Unix socket, with one `requests.Session`.

The default profile puts the management API on a Unix socket (config.properties says why: no web page can reach
it). A socket is named in a URL as `http+unix://<the socket's path, percent-encoded>/<path>`, the form
requests-unixsocket and docker-py use, so callers join paths onto a base URL the same way for both transports:
`session().get(unix_url("logs/management.sock") + "/models")`.
"""
from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

SCHEME = "http+unix"
UNIX = "unix:"  # TorchServe's notation for an address that is a Unix socket: `unix:/path/to.sock`


def unix_url(path: str | Path) -> str:
    """The base URL of the HTTP server listening on the Unix socket `path` (made absolute)."""
    return f"{SCHEME}://{quote(str(Path(path).absolute()), safe='')}"


def base_url(address: str) -> str:
    """A URL, or TorchServe's own notation for a socket (`unix:/path/to.sock`, relative paths allowed) as one."""
    return unix_url(address[len(UNIX):]) if address.startswith(UNIX) else address


def socket_path(url: str) -> Path | None:
    """The socket a `unix_url` names; None for a TCP URL."""
    parsed = urlparse(url)
    return Path(unquote(parsed.netloc)) if parsed.scheme == SCHEME else None


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, **kwargs) -> None:
        super().__init__("localhost", **kwargs)
        self._socket_path = path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if isinstance(self.timeout, (int, float)):
            sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        return sock


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str, **kwargs) -> None:
        super().__init__("localhost", **kwargs)
        self._socket_path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self._socket_path, timeout=self.timeout.connect_timeout)


class UnixAdapter(HTTPAdapter):
    """requests' transport for `http+unix://` URLs: one connection pool per socket."""

    def __init__(self) -> None:
        super().__init__()
        self._pools: dict[str, _UnixPool] = {}

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None) -> _UnixPool:
        path = str(socket_path(request.url))
        if path not in self._pools:
            self._pools[path] = _UnixPool(path)
        return self._pools[path]

    def request_url(self, request, proxies) -> str:
        return request.path_url

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        super().close()


def session() -> requests.Session:
    """A session that speaks http(s):// over TCP and http+unix:// over a Unix socket."""
    s = requests.Session()
    s.mount(f"{SCHEME}://", UnixAdapter())
    return s
