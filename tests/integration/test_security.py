"""No web page, from any origin and DNS rebinding included, can change the default profile's server.

The default profile (`make serve`) has token authorization off, so what keeps a page the user happens to open
from registering models and starting workers is where the management API listens: a Unix socket in the run
folder, which a browser cannot reach at all (config.properties, SECURITY.md). These tests attack every TCP
socket java listens on (read from the kernel), from curl-like requests with a foreign `Origin` and `Host` and
from a real headless Chromium: a cross-origin no-cors POST, and a page whose name is re-pointed at the server
after it loaded (DNS rebinding, rebuilt with a TCP forwarder on the page's own port).
"""
from __future__ import annotations

import http.server
import os
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import pytest
import requests

from serving.config import free_ports
from serving.transport import socket_path
from tests import browser
from tests.conftest import require
from tests.integration.test_reliability import listening

REGISTER = "/models?url=mnist.mar&model_name={name}&initial_workers=1&synchronous=true"


def registered(server) -> dict[str, int]:
    """model name → workers of every registered version, read over the management socket."""
    names = [m["modelName"] for m in server.http.get(f"{server.url('management')}/models", timeout=30).json()["models"]]
    return {name: sum(len(d["workers"]) for d in server.describe(name)) for name in names}


def test_the_management_api_is_a_socket_only_its_owner_can_use(served):
    """No TCP port serves it; its socket belongs to this user and nobody else may write to (connect to) it."""
    path = socket_path(served.url("management"))
    assert path is not None and path.parent == served.run_dir, served.url("management")
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode) and path.stat().st_uid == os.getuid()
    assert not mode & (stat.S_IWGRP | stat.S_IWOTH), oct(mode)
    assert registered(served)  # and it answers


def test_no_tcp_port_takes_a_registration_or_lists_models(served):
    """A registration POST (what a page's no-cors form or fetch sends) and a model listing, with another site's
    Origin and a rebinding page's Host, to every TCP socket java listens on: none registers anything, none
    answers a model list, and no worker starts."""
    before = registered(served)
    ports = sorted(port for _, port in listening(served))
    foreign = {"Origin": "http://evil.example"}
    for port in ports:
        base = f"http://127.0.0.1:{port}"
        for headers in (foreign, {**foreign, "Host": f"evil.example:{port}"}):
            try:
                posted = requests.post(base + REGISTER.format(name=f"curl{port}"), headers=headers, timeout=30)
                listed = requests.get(f"{base}/models", headers=headers, timeout=30)
            except requests.ConnectionError:  # the gRPC ports speak HTTP/2 only and drop an HTTP/1.1 request
                continue
            assert posted.status_code != 200, (port, posted.text[:200])
            assert listed.status_code != 200 or "models" not in listed.text, (port, listed.text[:200])
    assert registered(served) == before


class Phase(http.server.BaseHTTPRequestHandler):
    """The attacker's site before the rebinding: the page, then `wait` for every poll of /phase."""

    page = b""

    def do_GET(self) -> None:
        body = self.page if self.path == "/" else b"wait"
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path == "/" else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def forwarder(port: int, target: int) -> Iterator[None]:
    """After the rebinding: the page's host name now leads to the server. Every connection to `port` is piped
    to 127.0.0.1:`target`, so the browser's same-origin requests arrive with the page's own Host header."""
    listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
    listener.settimeout(0.2)
    stop = threading.Event()

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", target))
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        listener.close()


# The page: first no-cors POSTs to every TCP port of the server (a cross-site request needs no permission to be
# sent); then it polls its own origin until the name leads to the server, and tries to list and register there,
# writing what it could read into the document.
ATTACK = """<!doctype html><title>pending</title><pre id=out></pre><script>
const ports = %(ports)s, out = [];
(async () => {
  for (const port of ports) {
    try { await fetch(`http://127.0.0.1:${port}%(csrf)s`.replace('{name}', `csrf${port}`),
                      {method: 'POST', mode: 'no-cors'}); } catch (e) {}
  }
  out.push('csrf sent');
  document.title = 'polling';
  while (true) {
    const r = await fetch('/phase', {cache: 'no-store'}).catch(() => null);
    if (r && (await r.text()) !== 'wait') break;
    await new Promise(done => setTimeout(done, 200));
  }
  for (const [method, path] of [['GET', '/models'], ['POST', '%(rebound)s']]) {
    try {
      const r = await fetch(path, {method, cache: 'no-store'});
      out.push(`${method} ${path} ${r.status} ${(await r.text()).replace(/\\s+/g, ' ').slice(0, 300)}`);
    } catch (e) { out.push(`${method} ${path} failed ${e}`); }
  }
  document.getElementById('out').textContent = out.join('\\n');
  document.title = 'done';
})();
</script>"""


@pytest.mark.parametrize("api", ["inference", "metrics"])
def test_a_page_of_another_origin_and_a_rebound_page_change_nothing(served, api):
    """Headless Chromium opens http://evil.example:<port>/ (the name given 127.0.0.1 by a host-resolver rule).
    The page POSTs registrations no-cors to every TCP port of the server; then its name is re-pointed at the
    server's `api` port (a forwarder takes over the page's port), so its same-origin requests reach TorchServe
    with `Host: evil.example:<port>` and their answers are the page's to read. It can read no model list and
    register nothing, and no worker starts."""
    require(browser.available(), "chromium and chromedriver are not installed (make browser-deps installs "
                                 "Debian's packages)")
    before = registered(served)
    ports = sorted(port for _, port in listening(served))
    target = urlparse(served.url(api)).port
    Phase.page = (ATTACK % {"ports": ports, "csrf": REGISTER, "rebound": REGISTER.format(name="rebound")}).encode()
    [port] = free_ports(1)
    site = http.server.HTTPServer(("127.0.0.1", port), Phase)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    with browser.Browser(args=("--host-resolver-rules=MAP evil.example 127.0.0.1",)) as chromium:
        chromium.open(f"http://evil.example:{port}/")
        chromium.wait_for("return document.title === 'polling'")  # the no-cors POSTs have all been sent
        site.shutdown()
        site.server_close()
        with forwarder(port, target):
            chromium.wait_for("return document.title === 'done'", timeout=90)
            seen = chromium.script("return document.getElementById('out').textContent")
    lines = seen.splitlines()
    assert lines[0] == "csrf sent" and len(lines) == 3, seen
    listing, registration = lines[1], lines[2]
    assert not listing.startswith("GET /models 200") or '"models"' not in listing, listing
    assert " 200 " not in registration, registration
    assert registered(served) == before
