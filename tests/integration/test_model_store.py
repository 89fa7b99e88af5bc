"""Only archives in this server's own model store can be registered, by name: no URL of any kind, no `..`, no
absolute path, no folder elsewhere that happens to be called model_store; and `make serve` refuses a store every
user can write to or one holding a link that points out of it."""
from __future__ import annotations

import shutil

import pytest

from serving.catalog import ROOT
from serving.preflight import StartupError
from serving.process import TorchServe
from tests.integration.conftest import describe


@pytest.fixture
def elsewhere(tmp_path, model_store):
    """An archive in a folder named model_store that is not the server's (the reported attack's layout)."""
    folder = tmp_path / "x" / "model_store"
    folder.mkdir(parents=True)
    shutil.copy(model_store / "mnist.mar", folder / "e.mar")
    return folder / "e.mar"


@pytest.mark.parametrize("url, message", [
    ("file://{elsewhere}", "does not match any allowed URL"),
    ("file://{store}/mnist.mar", "does not match any allowed URL"),  # no URL at all, even into our own store
    ("http://127.0.0.1:9/evil.mar", "does not match any allowed URL"),
    ("../x/model_store/e.mar", "Relative path is not allowed"),
    ("{elsewhere}", "not found"),  # an absolute path is looked up by its file name inside the store only
])
def test_registration_outside_the_store_is_refused(served, model_store, elsewhere, url, message):
    url = url.format(elsewhere=elsewhere, store=model_store.resolve())
    before = sorted(p.name for p in model_store.iterdir())
    response = served.http.post(f"{served.url('management')}/models", params={"url": url, "model_name": "e",
                                                                              "initial_workers": 1}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert message.lower() in response.json()["message"].lower(), response.text
    assert sorted(p.name for p in model_store.iterdir()) == before  # nothing was copied into the store
    assert served.http.get(f"{served.url('management')}/models/e", timeout=30).status_code == 404


def test_registration_by_name_from_the_store_works(served):
    registered = served.http.post(f"{served.url('management')}/models", params={
        "url": "mnist.mar", "model_name": "mnist_by_name", "initial_workers": 1, "synchronous": "true"}, timeout=120)
    try:
        assert registered.status_code == 200, registered.text
        assert [d["modelVersion"] for d in describe(served, "mnist_by_name")] == ["1.0"]
    finally:
        served.http.delete(f"{served.url('management')}/models/mnist_by_name", timeout=120)


def test_serve_refuses_a_store_everyone_can_write(tmp_path, model_store):
    store = shutil.copytree(model_store, tmp_path / "store")
    store.chmod(0o777)
    with pytest.raises(StartupError, match="writable by every user"):
        TorchServe.on_free_ports(ROOT / "config.properties", tmp_path / "run", store).start()


def test_serve_refuses_a_link_out_of_the_store(tmp_path, model_store, elsewhere):
    store = shutil.copytree(model_store, tmp_path / "store")
    (store / "e.mar").symlink_to(elsewhere)
    with pytest.raises(StartupError, match="outside the model store"):
        TorchServe.on_free_ports(ROOT / "config.properties", tmp_path / "run", store).start()
