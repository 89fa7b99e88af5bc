"""What must hold before java starts, each failure said in one line with its fix.

TorchServe's own failures come late and far from their cause (a missing archive is a log line, a missing TLS key
a dead java), and its model store is a place from which any archive found is loaded and run: so the store, the
archives `make archive` recorded and the TLS files are checked first.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

from models.checksum import sha256_of
from serving.config import TLS_FILES


class StartupError(RuntimeError):
    """TorchServe did not come up; the message says which model/version failed and why, with short log tails."""


def check(model_store: Path, properties: dict[str, str], urls: list[str],
          declared: dict[str, dict[str, dict]]) -> None:
    """Every check below, for a server about to start with `properties`, whose APIs are at `urls` and whose
    config declares `declared` (model → version → settings)."""
    if shutil.which("java") is None:
        raise StartupError("java is not on PATH: TorchServe's frontend needs a JDK 17 (apt install openjdk-17-jdk)")
    check_store(model_store)
    check_archives(model_store, properties, declared)
    check_tls(properties, urls)


def check_store(model_store: Path) -> None:
    """The model store is ours alone: TorchServe registers any archive found in it by name, following links,
    so a store every user can write to, or a link in it pointing elsewhere, would let them run code as us.
    (Group write is left to the owner's umask: Debian and Ubuntu give each user a private group.)"""
    store = model_store.resolve()
    if not store.is_dir():
        raise StartupError(f"the model store {model_store} is not a folder: run `make archive` first")
    if store.stat().st_mode & 0o002:
        raise StartupError(f"the model store {store} is writable by every user (mode "
                           f"{store.stat().st_mode & 0o777:o}); `chmod o-w {store}` before serving from it")
    for entry in model_store.iterdir():
        if entry.is_symlink() and not entry.resolve().is_relative_to(store):
            raise StartupError(f"{entry} links to {entry.resolve()}, outside the model store; archives must "
                               "live in the store itself")


def check_archives(model_store: Path, properties: dict[str, str], declared: dict[str, dict[str, dict]]) -> None:
    """Every archive `load_models` or a declared version names exists and matches the sha256 `make archive`
    recorded."""
    names = [n.strip() for n in properties.get("load_models", "").split(",") if n.strip()]
    names += [settings["marName"] for versions in declared.values()
              for settings in versions.values() if settings.get("marName") not in names]
    for name in names:
        archive = model_store / name
        if not archive.is_file():
            raise StartupError(f"archive {archive} is missing: run `make archive` first")
        recorded = archive.with_name(archive.name + ".sha256")
        if not recorded.is_file():
            raise StartupError(f"{recorded} is missing: rebuild the archive with `make archive`")
        if recorded.read_text().split()[0] != sha256_of(archive):
            raise StartupError(f"{archive} does not match the sha256 recorded in {recorded} when it was built; "
                               "refusing to serve it (rebuild it with `make archive`)")


def check_tls(properties: dict[str, str], urls: list[str]) -> None:
    """A profile that speaks TLS needs its certificate and key before java starts (it would die later)."""
    if not any(urlparse(url).scheme == "https" for url in urls):
        return
    for key in TLS_FILES:
        path = properties.get(key)
        if not path or not Path(path).is_file():
            raise StartupError(f"{key} {path} is missing: this profile serves TLS; `make certs` writes a "
                               "self-signed pair for local use (real ones go at the same paths)")
