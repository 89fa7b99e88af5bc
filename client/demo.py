"""`make demo`: the demo page (client/static/demo.html) on 127.0.0.1, at the one origin TorchServe admits.

    python -m client.demo [--config config.properties]

The page's address is read from the config's `cors_allowed_origin`, the single place it is written: TorchServe
answers browsers calling from that origin and no other, so the page must be served exactly there. The printed
URL carries the inference API's address (`?api=`), read from the same config.
"""
from __future__ import annotations

import argparse
import functools
import http.server
from pathlib import Path
from urllib.parse import urlparse

from serving.catalog import ROOT
from serving.server import read_properties

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


def serve(origin: str, api: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A static file server for client/static on the origin's port (loopback only), not yet serving, and the
    page's URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(STATIC))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", urlparse(origin).port), handler)
    return server, f"{origin}/demo.html?api={api}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    args = p.parse_args(argv)
    server, url = serve(*origin_and_api(args.config))
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
