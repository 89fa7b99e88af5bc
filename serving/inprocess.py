"""Run a real archive's handler in this process, as a TorchServe worker would: for unit tests and for the
benchmark's in-process ceiling. No java, no sockets; the handler, model and Context are the real ones, and so is
the code: every module the handler imports comes from the unpacked archive, never from this repository, so a file
the archive lacks fails here exactly as it would in a worker."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a .mar the way TorchServe does (it is a zip) and return the model directory."""
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    return dest


# Packages the archive ships (serving/archive.py stages them) that this repository also has under the same names.
SHIPPED_PACKAGES = ("handlers", "models")


@contextlib.contextmanager
def archive_imports(model_dir: Path, names: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Import as a worker does, with the model directory first on sys.path and none of the repository's copies
    of `names` cached; afterwards the repository's modules are back and the archive's are handed out in the
    yielded dict (the handler keeps its references, so it goes on running the archive's code)."""
    def ours(name: str) -> bool:
        return name.split(".")[0] in names

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(model_dir))
    loaded: dict[str, Any] = {}
    try:
        yield loaded
    finally:
        sys.path.remove(str(model_dir))
        loaded.update({name: module for name, module in sys.modules.items() if ours(name)})
        for name in loaded:
            del sys.modules[name]
        sys.modules.update(saved)
    outside = {name: getattr(module, "__file__", None) for name, module in loaded.items()
               if not Path(getattr(module, "__file__", None) or "/").resolve().is_relative_to(model_dir.resolve())}
    if outside:
        raise ImportError(f"the handler imported modules from outside its archive {model_dir}: {outside}")


class InProcessHandler:
    """The handler class named in an unpacked archive's manifest, initialised over a real ts.context.Context."""

    def __init__(self, model_dir: Path, yaml_overrides: dict | None = None, gpu: int | None = None) -> None:
        import ts
        from ts.context import Context
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
        for key, value in (yaml_overrides or {}).items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        metrics.initialize_cache()
        self.context = Context(manifest["model"]["modelName"], str(model_dir), manifest, config["batchSize"],
                               gpu, "0.12.0", metrics=metrics, model_yaml_config=config)
        handler_module = Path(manifest["model"]["handler"]).stem
        model_module = Path(manifest["model"]["modelFile"]).stem
        with archive_imports(model_dir, (*SHIPPED_PACKAGES, handler_module, model_module)) as self.modules:
            module = importlib.import_module(handler_module)
            [handler_class] = [c for _, c in inspect.getmembers(module, inspect.isclass)
                               if c.__module__ == module.__name__]
            self.handler = handler_class()
            self.handler.initialize(self.context)  # imports the model file, from the archive too

    def _new_batch(self, rows: list[dict], headers: list[dict] | None) -> None:
        """What the worker does before each batch: fresh per-request headers, ids and response slots."""
        from ts.context import RequestProcessor

        headers = headers or [{} for _ in rows]
        self.context.request_processor = [RequestProcessor(h) for h in headers]
        self.context.request_ids = {i: str(uuid.uuid4()) for i in range(len(rows))}
        self.context.metrics.request_ids = self.context.request_ids

    def handle(self, rows: list[dict], headers: list[dict] | None = None) -> list[bytes]:
        """One server-side batch → the encoded bodies the worker would send back."""
        self._new_batch(rows, headers)
        outputs = self.handler.handle(rows, self.context)
        if len(outputs) != len(rows):
            raise RuntimeError(f"handler returned {len(outputs)} results for {len(rows)} requests")
        return outputs

    def preprocess(self, rows: list[dict]) -> Any:
        self._new_batch(rows, None)
        return self.handler.preprocess(rows)

    def run(self, rows: list[dict], headers: list[dict] | None = None) -> list[tuple[int, Any]]:
        """One server-side batch → [(status, decoded JSON body)] per row."""
        outputs = self.handle(rows, headers)
        return [(self.context.get_response_status(i)[0], json.loads(out)) for i, out in enumerate(outputs)]

    def one(self, row: dict, headers: dict | None = None) -> tuple[int, Any]:
        return self.run([row], [headers or {}])[0]
