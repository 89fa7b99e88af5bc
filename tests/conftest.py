"""Fixtures shared by every test: the real training data (when present), unpacked archives, handler contexts."""
from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_npz(dataset: str) -> Path:
    """The real training set, or a skip that says why: only CI and the project's machines have ../shared."""
    path = SHARED_DATA / f"{dataset}_train.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real {dataset} training set is only on CI and the project's machines")
    return path


@pytest.fixture(scope="session")
def validation_split():
    """Per data set, the (images, labels) of the fixed validation split of the real training data."""
    from training import data

    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
        if dataset not in cache:
            images, labels = data.load(dataset, "npz", shared_npz(dataset))
            split = data.split(images, labels, 5000)
            cache[dataset] = (split.val_images, split.val_labels)
        return cache[dataset]

    return get


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every shipped archive, built by the real archiver and unpacked as TorchServe unpacks it."""
    from serving import archive
    from serving.catalog import SHIPPED

    store = tmp_path_factory.mktemp("store")
    dirs = {}
    for version in SHIPPED:
        mar = archive.build(version, store)
        target = tmp_path_factory.mktemp(f"{version.model}-{version.version}")
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(target)
        dirs[version.model] = target
    return dirs


class HandlerHarness:
    """A real handler over a real unpacked archive and a real ts.context.Context, driven as a worker drives it."""

    def __init__(self, handler_class: type, model_dir: Path, yaml_overrides: dict | None = None) -> None:
        from ts.context import Context
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
        import ts

        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
        for key, value in (yaml_overrides or {}).items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        metrics.initialize_cache()
        self.context = Context(manifest["model"]["modelName"], str(model_dir), manifest, config["batchSize"],
                               None, "0.12.0", metrics=metrics, model_yaml_config=config)
        self.handler = handler_class()
        self.handler.initialize(self.context)

    def _new_batch(self, rows: list[dict], headers: list[dict] | None) -> None:
        """What the worker does before each batch: fresh per-request headers, ids and response slots."""
        from ts.context import RequestProcessor

        headers = headers or [{} for _ in rows]
        self.context.request_processor = [RequestProcessor(h) for h in headers]
        self.context.request_ids = {i: str(uuid.uuid4()) for i in range(len(rows))}
        self.context.metrics.request_ids = self.context.request_ids

    def preprocess(self, rows: list[dict]) -> Any:
        self._new_batch(rows, None)
        return self.handler.preprocess(rows)

    def run(self, rows: list[dict], headers: list[dict] | None = None) -> list[tuple[int, Any]]:
        """One server-side batch → [(status, decoded JSON body)] per row."""
        self._new_batch(rows, headers)
        outputs = self.handler.handle(rows, self.context)
        assert len(outputs) == len(rows)
        return [(self.context.get_response_status(i)[0], json.loads(out)) for i, out in enumerate(outputs)]

    def one(self, row: dict, headers: dict | None = None) -> tuple[int, Any]:
        return self.run([row], [headers or {}])[0]


@pytest.fixture(scope="session")
def harness(model_dirs):
    """harness("cifar10") → a HandlerHarness; the optional YAML overrides build a separate one."""
    import sys

    from handlers.cifar10 import Cifar10Classifier
    from handlers.mnist import MnistClassifier

    for path in model_dirs.values():  # TorchServe puts the model dir on sys.path to import the model file
        sys.path.insert(0, str(path))
    classes = {"cifar10": Cifar10Classifier, "mnist": MnistClassifier}
    cache: dict[str, HandlerHarness] = {}

    def get(model: str, **yaml_overrides: Any) -> HandlerHarness:
        if yaml_overrides:
            return HandlerHarness(classes[model], model_dirs[model], yaml_overrides)
        if model not in cache:
            cache[model] = HandlerHarness(classes[model], model_dirs[model])
        return cache[model]

    return get
