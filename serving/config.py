"""The config file a TorchServe starts with, and the ports and sockets it names.

`make serve` starts java from a copy of its profile (config.properties, or config.prod.properties) in logs/, with
TLS paths made absolute (java runs in the run folder) and the model store named; a test or benchmark server gets
the same copy with every port moved to a free one, so it runs beside `make serve` without touching it.
"""
from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from serving.catalog import ROOT
from serving.transport import UNIX

PROFILES = {"default": ROOT / "config.properties", "prod": ROOT / "config.prod.properties"}
def read_properties(path: Path) -> dict[str, str]:
    """A `.properties` file's keys and values (TorchServe's config: `key=value` lines, `#` comments)."""
    return parse_properties(path.read_text())


def parse_properties(text: str) -> dict[str, str]:
    properties = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


PORT_KEYS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
             "grpc_management_port", "grpc_front_port")


def free_ports(count: int) -> list[int]:
    """Ports the kernel says are free now. Another process may take one before java binds it, so a server
    configured from these retries with new ones when it sees a bind failure (`TorchServe.start`)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


TLS_FILES = ("certificate_file", "private_key_file")
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with its terminating NUL


def unix_socket(path: str, run_dir: Path) -> Path:
    """Where a `unix:` address's socket goes: a relative path is in the server's run folder (logs/ for `make
    serve`, so each server has its own). TorchServe needs it absolute, and the kernel limits its length."""
    socket_file = (run_dir / path).absolute() if not Path(path).is_absolute() else Path(path)
    if len(str(socket_file).encode()) > SOCKET_PATH_MAX:
        raise ValueError(f"the socket path {socket_file} is {len(str(socket_file).encode())} bytes; Unix sockets "
                         f"allow {SOCKET_PATH_MAX}: run from a shorter folder")
    return socket_file


def render_config(source: Path, dest: Path, store: Path, ports: dict[str, int] | None = None,
                  overrides: dict[str, str] | None = None) -> str:
    """The config TorchServe is started with, as it will read at `dest`: `source` with some keys overridden, the
    model store replaced, socket and TLS file paths made absolute (relative to the run folder and to the source's
    folder; java runs in the run folder), and optionally every port moved. A moved address keeps its scheme and
    host, so a server on free ports binds where its profile binds (a test of what the profile exposes sees what
    the profile exposes)."""
    lines, overrides = [], dict(overrides or {})
    for line in source.read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        if key in overrides:
            value = overrides.pop(key)
            line = f"{key}={value}"
        if value.startswith(UNIX):
            line = f"{key}={UNIX}{unix_socket(value[len(UNIX):], dest.parent)}"
        elif ports and key in ports:
            address = urlparse(value)
            line = (f"{key}={address.scheme or 'http'}://{address.hostname or '127.0.0.1'}:{ports[key]}"
                    if key.endswith("_address") else f"{key}={ports[key]}")
        elif key == "model_store":
            line = f"model_store={store}"
        elif key in TLS_FILES and not Path(value).is_absolute():
            line = f"{key}={(source.parent / value).resolve()}"
        lines.append(line)
    lines += [f"{key}={value}" for key, value in overrides.items()]
    return "\n".join(lines) + "\n"


def write_config(source: Path, dest: Path, store: Path, ports: dict[str, int] | None = None,
                 overrides: dict[str, str] | None = None) -> Path:
    """`render_config`'s text, written to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(render_config(source, dest, store, ports, overrides))
    return dest


def config_on_free_ports(source: Path, dest: Path, store: Path, overrides: dict[str, str] | None = None) -> Path:
    """A copy of a config file with every port moved to a free one and the model store replaced, so a test or a
    benchmark server runs beside `make serve` without touching it."""
    return write_config(source, dest, store, dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS)))),
                        overrides)


def port_is_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (what java will try to do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True

