"""Every request shape the classifiers accept, reduced to a list of image byte strings.

One TorchServe request (one row of a server-side batch) may be raw image bytes, a multipart upload, base64
text, JSON `{"data": ...}` with a string, a list (a client-side batch) or the seeds' envelope objects, a
KServe v1 `{"instances": [...]}` body, or a KServe v2 (Open Inference Protocol) `{"inputs": [...]}` body
(`handlers.oip`). `parse` returns the images with where each came from, the response form the client expects
back, and the `topk` it asked for (validated by the handler, which knows the classes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from handlers import oip
from handlers.imaging import InputError, Limits, check_image_count, decode_base64, looks_like_base64

SINGLE, LIST, KSERVE, V2 = "single", "list", "kserve", oip.V2
DESCRIBE = "describe"  # the plan of a request that asks for the model's description, not a prediction
PARAMETERS = ("topk",)  # multipart fields that are options, not images
EXPECTED = ('send image bytes (curl -T img.png), a multipart file, base64 text, or JSON: {"data": "<base64>"}, '
            '{"data": ["<base64>", ...]}, {"data": [{"content_type": "image/png", "data": "<base64>", '
            '"shape": [C, H, W]}]}, {"instances": [{"b64": "<base64>"}]} (KServe v1) or {"inputs": [{"name": '
            '"images", "datatype": "BYTES", "shape": [1], "data": ["<base64>"]}]} (KServe v2)')


@dataclass(frozen=True)
class Item:
    """One image of a request: its bytes (or, for a v2 pixel tensor, its array), the `shape` its envelope
    declared (if any) and where it was found."""

    data: bytes
    where: str
    shape: Any = None
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class Request:
    items: list[Item]
    form: str
    topk: Any = None
    request_id: str | None = None


class Planned(NamedTuple):
    """A request that will be answered: where its images sit in the batch, and how to answer it."""

    start: int  # index of its first image in the batch
    count: int
    form: str  # SINGLE, LIST, KSERVE or V2
    k: int
    request_id: str | None
    explain: bool  # an explanation (Integrated Gradients) rather than a prediction


@dataclass
class Batch:
    """What flows through preprocess → inference → postprocess for one server-side batch."""

    images: torch.Tensor
    plans: list[InputError | str | Planned]  # per request row: the InputError to answer, DESCRIBE, or its Planned
    probabilities: torch.Tensor | None = None
    protocols: list[str | None] | None = None  # per row: KSERVE or V2 when it speaks one of KServe's protocols
    explaining: int | None = None  # the row whose explanation this batch computes, after answering the others
    # Per explained row: ([n, H, W] attributions summed over channels, [n] completeness deltas, [n] targets).
    explanations: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def parse(row: dict, limits: Limits) -> Request:
    """One request row, as TorchServe hands it to the handler, → its images. Raises InputError."""
    params = {key: row[key] for key in row if key.lower() in PARAMETERS}
    payload = [(key, value) for key, value in row.items() if key.lower() not in PARAMETERS]
    topk = next(iter(params.values()), None)
    if isinstance(topk, (bytes, bytearray)):
        topk = topk.decode("utf-8", "replace")
    if not payload:
        raise InputError(f"the request holds no image; {EXPECTED}", error_type="EmptyInput")
    if len(payload) > 1:  # a multipart upload of several files
        check_image_count(len(payload), limits)
        return Request([_raw_item(value, key) for key, value in payload], LIST, topk)
    request = _parse_value(payload[0][1], payload[0][0], limits)
    return request if request.topk is not None else Request(request.items, request.form, topk, request.request_id)


def protocol_of(row: dict) -> str | None:
    """KSERVE or V2 for a request in one of KServe's protocols (their errors are `{"error": ...}`), else None.
    Judged from the body's shape alone, so it works for a body too broken to parse further."""
    for value in row.values():
        if isinstance(value, (bytes, bytearray)) and value.lstrip()[:1] == b"{":
            head = bytes(value[:4096])
            if b'"inputs"' in head:
                return V2
            if b'"instances"' in head:
                return KSERVE
        if isinstance(value, dict):
            if "inputs" in value:
                return V2
            if "instances" in value:
                return KSERVE
    return None


def _parse_value(value: Any, where: str, limits: Limits) -> Request:
    if isinstance(value, (dict, list)):
        return _parse_json(value, limits)
    if value is None or isinstance(value, (bool, int, float)):  # a JSON scalar body, already decoded by the worker
        raise InputError(f"JSON body must be an object, got {_kind(value)}; {EXPECTED}", error_type="InvalidJSON")
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    head = raw.lstrip()[:1]
    if head in (b"{", b"["):
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"the body starts like JSON but does not parse ({type(exc).__name__}: "
                             f"{str(exc)[:200]})", error_type="InvalidJSON") from None
        return _parse_json(document, limits)
    return Request([_raw_item(value if isinstance(value, str) else raw, where)], SINGLE)  # text is base64


def _raw_item(value: Any, where: str) -> Item:
    """Bytes that are either an image or base64 text of one."""
    if isinstance(value, str):
        return Item(decode_base64(value), where)
    raw = bytes(value)
    if raw and looks_like_base64(raw):
        return Item(decode_base64(raw), where)
    return Item(raw, where)


def _parse_json(document: Any, limits: Limits) -> Request:
    if isinstance(document, list):
        return Request(_list_items(document, "body", limits), LIST)
    if not isinstance(document, dict):
        raise InputError(f"JSON body must be an object, got {type(document).__name__}; {EXPECTED}",
                         error_type="InvalidJSON")
    topk = document.get("topk")
    if "inputs" in document:
        found, topk, request_id = oip.parse(document, limits)
        items = [Item(b"", where, pixels=value) if isinstance(value, np.ndarray) else Item(value, where)
                 for where, value in found]
        return Request(items, V2, topk, request_id)
    if "instances" in document:
        instances = document["instances"]
        if not isinstance(instances, list) or not instances:
            raise InputError('"instances" must be a non-empty list of {"b64": "<base64>"} objects',
                             error_type="InvalidJSON")
        check_image_count(len(instances), limits)
        return Request([_instance(obj, f"instances[{i}]") for i, obj in enumerate(instances)], KSERVE, topk)
    if "data" not in document:
        keys = ", ".join(sorted(map(str, document))[:10]) or "none"
        raise InputError(f'JSON body has no "data" or "instances" key (keys: {keys}); {EXPECTED}',
                         error_type="InvalidJSON")
    data = document["data"]
    if isinstance(data, list):
        return Request(_list_items(data, "data", limits), LIST, topk)
    return Request([_entry(data, "data")], SINGLE, topk)


def _list_items(entries: list, where: str, limits: Limits) -> list[Item]:
    if not entries:
        raise InputError(f"{where} is an empty list; send at least one image", error_type="EmptyInput")
    check_image_count(len(entries), limits)
    return [_entry(entry, f"{where}[{i}]") for i, entry in enumerate(entries)]


def _entry(entry: Any, where: str) -> Item:
    """A base64 string or the seeds' {"content_type", "data", "shape"} envelope."""
    if isinstance(entry, str):
        return Item(_b64(entry, where), where)
    if isinstance(entry, dict):
        content_type = entry.get("content_type", "image/*")
        if not isinstance(content_type, str) or not content_type.startswith("image/"):
            raise InputError(f'{where}.content_type is {content_type!r}; it must be an image type such as '
                             '"image/png" or "image/jpeg"', error_type="UnsupportedContentType")
        if not isinstance(entry.get("data"), str):
            raise InputError(f'{where}.data must be a base64 string, got {_kind(entry.get("data"))}',
                             error_type="InvalidJSON")
        return Item(_b64(entry["data"], f"{where}.data"), where, entry.get("shape"))
    raise InputError(f"{where} must be a base64 string or an object with content_type, data and shape, "
                     f"got {_kind(entry)}", error_type="InvalidJSON")


def _instance(obj: Any, where: str) -> Item:
    """A KServe v1 instance: {"b64": ...}, {"image_bytes": {"b64": ...}}, {"data": ...} or a bare string."""
    if isinstance(obj, dict):
        if isinstance(obj.get("image_bytes"), dict):
            obj = obj["image_bytes"]
        value = obj.get("b64", obj.get("data"))
    else:
        value = obj
    if not isinstance(value, str):
        raise InputError(f'{where} must be {{"b64": "<base64>"}}, got {_kind(obj)}', error_type="InvalidJSON")
    return Item(_b64(value, where), where)


def _b64(text: str, where: str) -> bytes:
    try:
        return decode_base64(text)
    except InputError as exc:
        raise exc.at(where) from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
