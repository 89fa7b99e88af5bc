"""Run a real archive's handler in this process, as a TorchServe worker would: for unit tests and for the
benchmark's in-process ceiling. No java, no sockets; the handler, model and Context are the real ones, and so is
the code: every module the handler imports comes from the unpacked archive, never from this repository, so a file
the archive lacks fails here exactly as it would in a worker."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import struct
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


# What TorchServe 0.12's frontend puts in a request it forwards to a worker, by route (read off a real frontend by
# an echo handler: tests/integration/test_worker_rows.py keeps this harness equal to it). The client's own HTTP
# headers follow these; /predictions and /explanations add `url_path`, KServe's routes do not.
ROUTES = ("predictions", "explanations", "kserve", "kserve-explain", "describe", "grpc")
EXPLAIN_ROUTES = ("explanations", "kserve-explain")
KSERVE_ROUTES = ("kserve", "kserve-explain")
CLIENT_HEADERS = {"Accept": "*/*", "User-Agent": "python-requests", "Host": "127.0.0.1:8080"}


def frontend_request(row: dict, headers: dict | None = None, route: str = "predictions") -> dict:
    """One request as the frontend frames it for a worker: its id, its headers and its parameters, each with the
    content type the frontend gives it.

    Routes: /predictions, /explanations, KServe's v1/v2 predict ("kserve") and explain ("kserve-explain"), the
    management API's describe, and gRPC's Predictions. `row` holds what the client sent: {"body": ...} for a
    request body (bytes as sent; a dict or list is sent as JSON, a str as text/plain), other names for a
    multipart upload's parts (bytes: a file part, application/octet-stream; str: a text field). `headers` are
    the client's own HTTP headers. A gRPC request carries no headers at all, only its input map, each entry with
    an empty content type; a describe request no parameters.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    client = dict(headers or {})
    parameters: list[tuple[str, str, bytes]] = []
    multipart = list(row) != ["body"]
    if route != "describe":
        for name, value in row.items():
            if isinstance(value, (dict, list)):
                parameters.append((name, "application/json", json.dumps(value).encode()))
            elif isinstance(value, str):  # a text body, or a multipart form's text field (which has no type)
                parameters.append((name, "" if multipart else "text/plain", value.encode()))
            elif multipart:  # a multipart file part, typed as clients type a file they do not know
                parameters.append((name, "application/octet-stream", bytes(value)))
            else:
                parameters.append((name, client.get("Content-Type", ""), bytes(value)))
    request_id = str(uuid.uuid4())
    if route == "grpc":
        return {"requestId": request_id, "headers": [],
                "parameters": [(name, "", value) for name, _, value in parameters]}
    if route != "describe" and "Content-Type" not in client:
        if multipart:
            client["Content-Type"] = "multipart/form-data; boundary=harness"
        elif parameters[0][1]:
            client["Content-Type"] = parameters[0][1]
    framed: dict[str, str] = {}
    if route == "describe":
        framed["content-length"] = "0"
    else:
        framed["explain"] = str(route in EXPLAIN_ROUTES)
    framed.update({**CLIENT_HEADERS, **client})
    if route == "describe":
        framed["describe"] = "True"
    else:
        framed["Content-Length"] = str(sum(len(value) for _, _, value in parameters))
        if route not in KSERVE_ROUTES:
            framed["url_path"] = ""
    return {"requestId": request_id, "headers": list(framed.items()), "parameters": parameters}


def encode_batch(requests: list[dict]) -> bytes:
    """TorchServe's inference message (command `I`, then each request's id, headers and parameters as
    length-prefixed fields, each list ended by -1), as the frontend writes it on the worker's socket."""
    def field(data: bytes) -> bytes:
        return struct.pack("!i", len(data)) + data

    end = struct.pack("!i", -1)
    message = bytearray(b"I")
    for request in requests:
        message += field(request["requestId"].encode())
        for name, value in request["headers"]:
            message += field(name.encode()) + field(value.encode())
        message += end
        for name, content_type, value in request["parameters"]:
            message += field(name.encode()) + field(content_type.encode()) + field(value)
        message += end
    return bytes(message + end)


def worker_batch(requests: list[dict]) -> tuple[list[Any], list[dict], dict[int, str]]:
    """(per-request header processors, rows, request ids) exactly as a worker hands them to its handler:
    TorchServe's own message decoder (`ts.protocol.otf_message_handler`, which JSON-decodes application/json and
    text-decodes text/* parameters) over the encoded batch, then its own `Service.retrieve_data_for_inference`."""
    from ts.protocol.otf_message_handler import retrieve_msg
    from ts.service import Service

    _, batch = retrieve_msg(_Socket(encode_batch(requests)))
    return Service.retrieve_data_for_inference(batch)


class _Socket:
    """The one socket method the decoder calls, over bytes already received."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)

    def recv(self, size: int) -> bytes:
        return self.buffer.read(size)


def decode_reply(data: bytes) -> list[tuple[str, int, dict[str, str], bytes]]:
    """A worker's reply to a batch, as the frontend reads it: (request id, status, headers, body) per row. The
    format is `ts.protocol.otf_message_handler.create_predict_response`'s: a code and a message, then each row's
    id, content type, status, reason phrase, headers and body as length-prefixed fields, ended by -1."""
    buffer, rows = io.BytesIO(data), []

    def number() -> int:
        return struct.unpack("!i", buffer.read(4))[0]

    def field() -> bytes:
        return buffer.read(number())

    number(), field()  # the batch's code and message
    while (length := number()) != -1:
        request_id = buffer.read(length).decode()
        field()  # content type
        status = number()
        field()  # reason phrase
        headers = {field().decode(): field().decode() for _ in range(number())}
        rows.append((request_id, status, headers, field()))
    return rows


class _Frontend:
    """The worker's socket as the frontend's side of it sees one batch (`BatchAggregator.sendResponse`): replies
    arrive until one has no row that streams on (`ts_stream_next: true`); each row is answered once, or as a
    stream of chunks whose last one ends it. A row answered twice, or one after the batch ended, is the error
    that makes a real frontend restart the worker, so it raises here."""

    def __init__(self, ids: dict[int, str]) -> None:
        self.ids, self.bodies, self.open, self.done = ids, {}, set(), False
        self.replies: list[list[tuple[str, int, dict[str, str], bytes]]] = []  # every message, decoded

    def sendall(self, data: bytes) -> None:
        if self.done:
            raise RuntimeError("the worker replied after its batch's final message")
        streaming = False
        self.replies.append(decode_reply(data))
        for request_id, _, headers, body in self.replies[-1]:
            if request_id in self.bodies and request_id not in self.open:
                raise RuntimeError(f"request {request_id} was answered twice")
            self.bodies[request_id] = self.bodies.get(request_id, b"") + body
            if headers.get("ts_stream_next") == "true":
                self.open.add(request_id)
                streaming = True
            else:
                self.open.discard(request_id)
        self.done = not streaming

    def answers(self) -> list[bytes]:
        missing = [request_id for request_id in self.ids.values() if request_id not in self.bodies]
        if not self.done or self.open or missing:
            raise RuntimeError(f"the batch ended with requests unanswered: {sorted(self.open) or missing}")
        return [self.bodies[self.ids[idx]] for idx in sorted(self.ids)]


class InProcessHandler:
    """The handler class named in an unpacked archive's manifest, initialised over a real ts.context.Context."""

    def __init__(self, model_dir: Path, yaml_overrides: dict | None = None, gpu: int | None = None,
                 batch_size: int | None = None) -> None:
        """`batch_size`: what the frontend's load message says (a registration's `batch_size=`, else the YAML's
        batchSize), which is what `context.system_properties["batch_size"]` carries."""
        import ts
        from ts.context import Context
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

        self.model_dir = model_dir
        self.frontend: _Frontend | None = None  # what the frontend received for the last batch
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
        for key, value in (yaml_overrides or {}).items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        metrics.initialize_cache()
        self.context = Context(manifest["model"]["modelName"], str(model_dir), manifest,
                               batch_size or config["batchSize"], gpu, "0.12.0", metrics=metrics,
                               model_yaml_config=config)
        handler_module = Path(manifest["model"]["handler"]).stem
        model_module = Path(manifest["model"]["modelFile"]).stem
        with archive_imports(model_dir, (*SHIPPED_PACKAGES, handler_module, model_module)) as self.modules:
            module = importlib.import_module(handler_module)
            [handler_class] = [c for _, c in inspect.getmembers(module, inspect.isclass)
                               if c.__module__ == module.__name__]
            self.handler = handler_class()
            self.handler.initialize(self.context)  # imports the model file, from the archive too

    def _new_batch(self, rows: list[dict], headers: list[dict] | None, routes: str | list[str]) -> list[dict]:
        """What the frontend and the worker do before each batch: the requests framed and decoded as a worker
        receives them, fresh per-request headers, ids and response slots. Returns the worker's rows."""
        headers = headers or [{} for _ in rows]
        routes = [routes] * len(rows) if isinstance(routes, str) else routes
        requests = [frontend_request(row, h, route) for row, h, route in zip(rows, headers, routes, strict=True)]
        processors, worker_rows, ids = worker_batch(requests)
        self.context.request_processor = processors
        self.context.request_ids = ids
        self.context.metrics.request_ids = ids
        return worker_rows

    def handle(self, rows: list[dict], headers: list[dict] | None = None,
               routes: str | list[str] = "predictions") -> list[bytes]:
        """One server-side batch → the bodies the frontend would deliver, from every message the worker sends
        for it (the handler may answer some rows before the others). `routes`: one for the whole batch or one
        per row (`frontend_request` lists them)."""
        from ts.protocol.otf_message_handler import create_predict_response

        worker_rows = self._new_batch(rows, headers, routes)
        frontend = self.frontend = _Frontend(dict(self.context.request_ids))
        self.context.cl_socket = frontend
        outputs = self.handler.handle(worker_rows, self.context)
        if len(outputs) != len(rows):
            raise RuntimeError(f"handler returned {len(outputs)} results for {len(rows)} requests")
        # What ts.service.Service.predict sends when the handler returns, for the rows still in request_ids.
        frontend.sendall(create_predict_response(outputs, self.context.request_ids, "Prediction success", 200,
                                                 self.context))
        return frontend.answers()

    def preprocess(self, rows: list[dict]) -> Any:
        return self.handler.preprocess(self._new_batch(rows, None, "predictions"))

    def run(self, rows: list[dict], headers: list[dict] | None = None,
            routes: str | list[str] = "predictions") -> list[tuple[int, Any]]:
        """One server-side batch → [(status, decoded JSON body)] per row."""
        outputs = self.handle(rows, headers, routes)
        return [(self.context.get_response_status(i)[0], json.loads(out)) for i, out in enumerate(outputs)]

    def one(self, row: dict, headers: dict | None = None, route: str = "predictions") -> tuple[int, Any]:
        return self.run([row], [headers or {}], route)[0]
