"""KServe's Open Inference Protocol (v2) spoken natively, one request at a time.

TorchServe's own KServe envelopes (`TS_SERVICE_ENVELOPE=kserve|kservev2`) parse only the first request of a
server-side batch and answer the whole batch once, so with batching on they fail every other request. This
project's handler speaks both KServe protocols itself, per request: v1 (`{"instances": [...]}`) in
`handlers.payload`, v2 here, and `disable_torchserve_envelopes` makes TorchServe's envelopes pass-throughs inside
this archive's workers, so the same archive serves both protocols whatever TS_SERVICE_ENVELOPE KServe sets.

A v2 request holds one input tensor: BYTES (base64-encoded images, shape [N] or -1), or UINT8 (0-255) / FP32
(0-1, torchvision's ToTensor scale) pixels of shape [N, C, H, W] or [N, H, W, C] ([N, H, W] for one channel)
matching the model's input exactly. The answer holds two outputs of shape [N, k]: `labels` (BYTES) and
`probabilities` (FP32), highest first, with the request's `id` echoed; an error is `{"error": "..."}`.
"""
from __future__ import annotations

import logging
import math
import sys
import types
import uuid
from typing import Any

import numpy as np

from handlers.imaging import InputError, Limits, check_image_count, decode_base64

logger = logging.getLogger(__name__)

V2 = "v2"
TENSOR_TYPES = {"UINT8": (np.uint8, 0, 255), "FP32": (np.float32, 0.0, 1.0)}
ENVELOPES = ("kserve", "kservev2")
# TorchServe versions whose loader imports the handler before the envelope (read in ts/model_loader.py, and run
# with KServe's own server in front by tests/integration/test_kserve_pod.py)
LOADER_CHECKED = ("0.9.0", "0.12.0")


def parse(document: dict, limits: Limits) -> tuple[list[tuple[str, bytes | np.ndarray]], Any, str | None]:
    """A v2 request body → ([(where, image bytes or one image's pixel array)], topk, id). Raises InputError."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError('a v2 request needs "inputs": a list of exactly one tensor, e.g. {"name": "images", '
                         '"datatype": "BYTES", "shape": [1], "data": ["<base64 image>"]}', error_type="InvalidJSON")
    tensor = inputs[0]
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError('"id" must be a string', error_type="InvalidJSON")
    parameters = document.get("parameters") or {}
    topk = parameters.get("topk") if isinstance(parameters, dict) else None
    datatype = tensor.get("datatype")
    if datatype == "BYTES":
        return _bytes_items(tensor, limits), topk, request_id
    if datatype in TENSOR_TYPES:
        return _tensor_items(tensor, datatype, limits), topk, request_id
    raise InputError(f"inputs[0].datatype is {datatype!r}; send BYTES (base64-encoded images), UINT8 pixels "
                     "(0-255) or FP32 pixels (0-1)", error_type="UnsupportedDatatype")


def _shape(tensor: dict) -> list[int] | None:
    shape = tensor.get("shape")
    if shape in (-1, [-1], None):
        return None
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                              for d in shape):
        raise InputError(f"inputs[0].shape must be a list of positive integers (or -1), got {shape!r}",
                         error_type="ShapeMismatch")
    return shape


def _bytes_items(tensor: dict, limits: Limits) -> list[tuple[str, bytes | np.ndarray]]:
    data = tensor.get("data")
    entries = [data] if isinstance(data, str) else data
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise InputError("inputs[0].data must be a base64 string or a non-empty list of them for BYTES",
                         error_type="InvalidJSON")
    shape = _shape(tensor)
    if shape is not None and math.prod(shape) != len(entries):
        raise InputError(f"inputs[0].shape {shape} holds {math.prod(shape)} elements but data has {len(entries)}",
                         error_type="ShapeMismatch")
    check_image_count(len(entries), limits)
    items: list[tuple[str, bytes | np.ndarray]] = []
    for i, entry in enumerate(entries):
        try:
            items.append((f"inputs[0].data[{i}]", decode_base64(entry)))
        except InputError as exc:
            raise exc.at(f"inputs[0].data[{i}]") from None
    return items


def _tensor_items(tensor: dict, datatype: str, limits: Limits) -> list[tuple[str, bytes | np.ndarray]]:
    shape = _shape(tensor)
    if shape is None or len(shape) < 3:
        raise InputError(f"a {datatype} input needs its shape: [N, C, H, W] or [N, H, W, C] ([N, H, W] for one "
                         "channel)", error_type="ShapeMismatch")
    check_image_count(shape[0], limits)
    if math.prod(shape[1:]) > limits.max_pixels * 4:
        raise InputError(f"inputs[0].shape {shape} is far larger than any image this model takes",
                         status=413, error_type="ImageTooLarge")
    dtype, low, high = TENSOR_TYPES[datatype]
    try:
        values = np.asarray(tensor.get("data"), dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"inputs[0].data must be numbers for {datatype}", error_type="InvalidJSON") from None
    if values.size != math.prod(shape):
        raise InputError(f"inputs[0].shape {shape} holds {math.prod(shape)} elements but data has {values.size}",
                         error_type="ShapeMismatch")
    if not np.isfinite(values).all() or values.min() < low or values.max() > high:
        raise InputError(f"{datatype} pixels must lie in [{low}, {high}]" + (
            " (torchvision's ToTensor scale; send UINT8 for 0-255)" if datatype == "FP32" else ""),
            error_type="OutOfRange")
    if datatype == "UINT8" and not np.array_equal(values, np.round(values)):
        raise InputError("UINT8 pixels must be integers", error_type="OutOfRange")
    images = values.astype(dtype).reshape(shape)
    return [(f"inputs[0][{i}]", image) for i, image in enumerate(images)]



def to_pixels(array: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """One image's tensor as sent → uint8 (H, W, C), checked against the model's (C, H, W)."""
    channels, height, width = input_shape
    if array.shape == (channels, height, width):
        array = array.transpose(1, 2, 0)
    elif channels == 1 and array.shape == (height, width):
        array = array[:, :, None]
    elif array.shape != (height, width, channels):
        raise InputError(f"each image is {list(array.shape)}, but this model takes {[channels, height, width]} "
                         f"(or {[height, width, channels]}); tensors are not resized: send BYTES to have images "
                         "resized", error_type="ShapeMismatch")
    if array.dtype != np.uint8:
        array = np.round(array * 255.0)
    return np.ascontiguousarray(array, dtype=np.uint8)


def answer(model_name: str, version: str, request_id: str | None, outputs: list[dict]) -> dict:
    """A v2 answer around its output tensors; the request's id echoed, or a new one."""
    return {"id": request_id or str(uuid.uuid4()), "model_name": model_name, "model_version": version,
            "outputs": outputs}


def response(model_name: str, version: str, request_id: str | None, labels: list[list[str]],
             probabilities: list[list[float]]) -> dict:
    """The v2 answer to a prediction: labels and probabilities, each [N, k], highest first."""
    n, k = len(labels), len(labels[0]) if labels else 0
    return answer(model_name, version, request_id, [
        {"name": "labels", "datatype": "BYTES", "shape": [n, k], "data": [x for row in labels for x in row]},
        {"name": "probabilities", "datatype": "FP32", "shape": [n, k],
         "data": [p for row in probabilities for p in row]}])


class _PassThrough:
    """Stands in for a TorchServe request envelope: hands every request to the handler unchanged."""

    def __init__(self, handle_fn: Any) -> None:
        self.handle = handle_fn


def disable_torchserve_envelopes() -> None:
    """Make `TS_SERVICE_ENVELOPE=kserve|kservev2` a no-op in this process (a TorchServe worker).

    The worker's loader (ts/model_loader.py `TsModelLoader.load`) imports the handler module, then imports
    `ts.torch_handler.request_envelope.<name>` and wraps the handler's `handle` in that module's first class, and
    only then calls `initialize`: by `initialize` the envelope already wraps the handler, so this runs when the
    handler module is imported. Registering pass-through modules under those names then keeps the per-request
    protocol handling of this archive in charge, with batching intact. `check_loader` says, from `initialize`,
    when the TorchServe running is not one whose loader was read and tested to work this way.
    """
    for name in ENVELOPES:
        module = types.ModuleType(f"ts.torch_handler.request_envelope.{name}",
                                  "Pass-through: this archive speaks the KServe protocols itself (handlers.oip).")
        passthrough = type("PassThrough", (_PassThrough,), {"__module__": module.__name__})
        module.PassThrough = passthrough
        sys.modules[module.__name__] = module


def check_loader(server_version: str | None) -> None:
    """Log when this TorchServe's loader was not checked to import the handler before the envelope: there, KServe
    requests through TorchServe's own envelopes may be read batch-wide rather than one request at a time."""
    if str(server_version) not in LOADER_CHECKED:
        logger.warning("TorchServe %s is not one whose loader was checked to let this handler replace the KServe "
                       "envelopes (%s): with service_envelope set, check that KServe v1/v2 requests still answer "
                       "one by one", server_version, ", ".join(LOADER_CHECKED))
