"""A headless Chromium driven over the W3C WebDriver protocol: chromedriver's own HTTP API, spoken with
`requests` (the protocol Selenium speaks, without Selenium's dependency tree)."""
from __future__ import annotations

import base64
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from serving.config import free_ports

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key under which an element reference comes back


def available() -> bool:
    return shutil.which("chromium") is not None and shutil.which("chromedriver") is not None


class Browser:
    """One chromedriver process and one headless Chromium session; use as a context manager."""

    def __init__(self, width: int = 1000, height: int = 760, args: tuple[str, ...] = ()) -> None:
        """`args`: more Chromium switches (`--host-resolver-rules=...` to give a made-up name an address)."""
        [port] = free_ports(1)
        self.base = f"http://127.0.0.1:{port}"
        self.driver = subprocess.Popen([shutil.which("chromedriver"), f"--port={port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{self.base}/status", timeout=2).json()["value"]["ready"]:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.driver.kill()
                raise RuntimeError("chromedriver did not become ready within 30 s")
            time.sleep(0.2)
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": shutil.which("chromium"),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", *args]}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        response = requests.request(method, self.base + path, json=body, timeout=60)
        value = response.json()["value"]
        if response.status_code != 200:
            raise RuntimeError(f"WebDriver {method} {path}: {value}")
        return value

    def _session(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self._session("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def upload(self, css: str, path: Path) -> None:
        """Put a file into an <input type=file>, as a person picking it would (fires `change`)."""
        self._session("POST", f"/element/{self.find(css)}/value", {"text": str(path)})

    def script(self, source: str, *args: Any) -> Any:
        return self._session("POST", "/execute/sync", {"script": source, "args": list(args)})

    def wait_for(self, source: str, timeout: float = 60.0) -> Any:
        """Poll a script until it returns something truthy; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.script(source)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"the page never satisfied: {source}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._session("DELETE", "")
        finally:
            self.driver.terminate()
            self.driver.wait(timeout=30)
