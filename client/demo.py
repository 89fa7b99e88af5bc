"""`make demo`: the demo page (client/static/demo.html) on 127.0.0.1, at the one origin TorchServe admits.

    python -m client.demo [--config config.properties]

The page's address is read from the config's `cors_allowed_origin`, the single place it is written: TorchServe
answers browsers calling from that origin and no other, so the page must be served exactly there. `/` is the
page; `/versions` tells it the inference API's address and the cifar10 versions the running server has (asked
of the management API at each request, so a version registered or retired since is seen), and why not when the
server does not answer. Only GET, only the page and those two answers (no directory listing), only to requests
addressed to this origin's host (a DNS-rebound page gets 421): nothing here changes the server's state.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from client.api import ServerError, TorchServeClient
from serving.catalog import ROOT
from serving.config import read_properties
from serving.server import local, running_profile

STATIC = Path(__file__).resolve().parent / "static"


def origin_and_api(config: Path) -> tuple[str, str]:
    """(the page's origin, the inference API's base URL) from a TorchServe config."""
    properties = read_properties(config)
    origin = properties.get("cors_allowed_origin", "")
    parsed = urlparse(origin)
    if parsed.scheme != "http" or parsed.hostname not in ("127.0.0.1", "localhost") or not parsed.port:
        raise SystemExit(f"{config}: cors_allowed_origin must be one http://127.0.0.1:<port> origin for the demo "
                         f"page, not {origin!r}")
    return origin, properties["inference_address"]


MODEL = "cifar10"  # the page explains cifar10's versions (its map is drawn for a 32×32 RGB input)


def versions(inference: str, management: str) -> dict[str, Any]:
    """What the page needs to start: the inference API, the versions with the default marked, or the error."""
    answer: dict[str, Any] = {"api": inference, "model": MODEL, "versions": [], "error": None}
    try:
        listed = TorchServeClient(inference_url=inference, management_url=management, timeout=5).versions(MODEL)
    except (requests.ConnectionError, OSError):
        answer["error"] = f"TorchServe does not answer at {inference}: is it running (make serve)?"
    except ServerError as exc:
        answer["error"] = (f"TorchServe has no {MODEL} version registered (make serve registers them)"
                           if exc.status == 404 else f"TorchServe's management API answered {exc}")
    except requests.RequestException as exc:
        answer["error"] = f"TorchServe's management API did not answer: {exc}"
    else:
        answer["versions"] = [{"version": d["modelVersion"], "default": d["default"], "archive": d.get("modelUrl"),
                               "ready": sum(w.get("status") == "READY" for w in d.get("workers", []))}
                              for d in listed]
    return answer


class DemoHandler(http.server.SimpleHTTPRequestHandler):
    """The page at `/`, its static files, and `/versions`; GET and HEAD only (the base class answers 501 to
    anything else)."""

    def __init__(self, *args: Any, host: str, inference: str, management: str, **kwargs: Any) -> None:
        self.host, self.inference, self.management = host, inference, management
        super().__init__(*args, directory=str(STATIC), **kwargs)

    def _addressed_here(self) -> bool:
        if self.headers.get("Host") in (self.host, self.host.replace("127.0.0.1", "localhost")):
            return True
        self.send_error(421, "Misdirected Request: this page answers only at its own origin")
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._addressed_here():
            return
        path = urlparse(self.path).path
        if path == "/versions":
            body = json.dumps(versions(self.inference, self.management)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if path == "/":
            self.path = "/demo.html"
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if self._addressed_here():
            super().do_HEAD()

    def list_directory(self, path: Any) -> None:
        self.send_error(404, "Not Found")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's signature)
        pass  # one line per request on the terminal the page was started from says nothing the page does not


def serve(origin: str, inference: str, management: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A server for the page on the origin's port (loopback only), not yet serving, and the page's URL."""
    port = urlparse(origin).port
    handler = functools.partial(DemoHandler, host=f"127.0.0.1:{port}", inference=inference, management=management)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    return server, f"{origin}/"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    args = p.parse_args(argv)
    origin, inference = origin_and_api(args.config)
    server, url = serve(origin, inference, local(running_profile()).url("management"))
    print(f"demo page: {url}  (TorchServe must be running: make serve; Ctrl-C stops the page)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
