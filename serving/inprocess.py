"""Run a real archive's handler in this process, as a TorchServe worker would: for unit tests and for the
benchmark's in-process ceiling. No java, no sockets; the handler, model and Context are the real ones."""
from __future__ import annotations

import importlib
import inspect
import json
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import yaml


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a .mar the way TorchServe does (it is a zip) and return the model directory."""
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    return dest


class InProcessHandler:
    """The handler class named in an unpacked archive's manifest, initialised over a real ts.context.Context."""

    def __init__(self, model_dir: Path, yaml_overrides: dict | None = None) -> None:
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
                               None, "0.12.0", metrics=metrics, model_yaml_config=config)
        if str(model_dir) not in sys.path:
            # TorchServe puts the model directory first on sys.path; appending it instead lets this repository's
            # own packages (identical to the archive's copies, which lack zoo.py and training) stay importable.
            sys.path.append(str(model_dir))
        module = importlib.import_module(Path(manifest["model"]["handler"]).stem)
        [handler_class] = [c for _, c in inspect.getmembers(module, inspect.isclass)
                           if c.__module__ == module.__name__]
        self.handler = handler_class()
        self.handler.initialize(self.context)

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
