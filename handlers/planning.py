"""Planning one server-side batch: which requests are decoded, and which answer on their own.

Every request is judged from its own headers and body (TorchServe's base handler decides a whole batch from the
first request's headers, so one client could fail everyone else's requests), and the work one request may cause
is bounded (`Limits`): pixels per request and per batch, checked from the image headers before anything is
decoded, and a deadline per batch well inside the frontend's response timeout, so no request can make the
frontend declare the worker dead. A first pass reads every request's headers and parses its body; the second
decodes them cheapest first, so a small request batched with expensive ones is never the one that runs out of
pixel budget or time. Past the batch's budget or deadline a request answers 503 with Retry-After, undecoded; the
first request decoded is always served.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from handlers import oip, payload
from handlers.imaging import InputError, Limits, decode_opened, open_image
from models.specs import DatasetSpec

logger = logging.getLogger(__name__)

TOPK_HEADERS = ("x-topk", "topk")
RETRY_AFTER_S = 1  # a request refused for lack of batch budget or time succeeds when sent again


@dataclass(frozen=True)
class Rules:
    """What a request is judged by: the version's spec and limits, its default top-k, and what an explanation
    costs (settled once, in `initialize`, from the model-config YAML)."""

    spec: DatasetSpec
    limits: Limits
    topk: int
    explain_steps: int
    can_explain: bool  # Captum is installed

    @property
    def num_classes(self) -> int:
        return len(self.spec.classes)


class Opened(NamedTuple):
    """A request after the first pass: its images opened (headers read, nothing decoded), how to answer it, and
    what decoding it will cost in pixels."""

    images: list[tuple[Any, str]]  # (a Pillow image not yet decoded, or a v2 pixel array; where it came from)
    form: str
    k: int
    request_id: str | None
    explain: bool
    cost: int


def busy(why: str) -> InputError:
    """A request refused for now, not for what it is: it succeeds when sent again."""
    return InputError(f"{why}; send it again", status=503, error_type="Busy", retry_after=RETRY_AFTER_S)


def detached(error: InputError) -> InputError:
    """`error` as a request's answer to keep: without its traceback or the exception it was raised while handling
    (Pillow's, base64's). Those hold the frames that raised it, and the planning frame holds its plans, so a kept
    error would close a cycle only Python's cyclic GC frees; a worker's heap is large and long-lived, full
    collections are rare, and such garbage piled up for as long as bad requests came (+12 MiB per cifar10 worker
    in 4 minutes of them, docs/serving.md "Memory"). Detached, reference counting frees each batch as it ends."""
    error.__context__ = error.__cause__ = None
    return error.with_traceback(None)


@contextmanager
def located(where: str) -> Iterator[None]:
    """An InputError raised inside says where in the request it happened (`data[2]: ...`), except for a body
    that is the image itself."""
    try:
        yield
    except InputError as exc:
        raise exc if where == "body" else exc.at(where) from None


def clamp_topk(value: Any, source: str, num_classes: int) -> int:
    """A positive integer, clamped to the number of classes; anything else is the client's error."""
    if isinstance(value, str) and re.fullmatch(r"\s*\+?\d+\s*", value):
        value = int(value)
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{source} must be a positive integer (1 to {num_classes}; larger values are clamped), "
                         f"got {json.dumps(value) if not isinstance(value, str) else repr(value)}",
                         error_type="InvalidTopK")
    return min(value, num_classes)


def request_topk(request: payload.Request, headers: dict[str, str], rules: Rules) -> int:
    """The request's own `topk` (body or multipart field), else an `X-TopK`/`topk` header, else the YAML's."""
    if request.topk is not None:
        return clamp_topk(request.topk, "topk", rules.num_classes)
    for name in TOPK_HEADERS:
        if name in headers:
            return clamp_topk(headers[name], f"the {name} header", rules.num_classes)
    return rules.topk


def check_shape(item: payload.Item, spec: DatasetSpec) -> None:
    """The seeds' envelope may declare a shape; it must describe this model's input."""
    expected = list(spec.input_shape)
    accepted = [expected] + ([expected[1:]] if spec.channels == 1 else [])
    if item.shape is not None and item.shape not in accepted:
        raise InputError(f"{item.where}.shape is {json.dumps(item.shape)}, but {spec.name} expects "
                         f"{json.dumps(expected)} (channels, height, width); omit shape to let the server resize any "
                         "image", error_type="ShapeMismatch")


def open_request(row: dict, headers: dict[str, str], explain: bool, rules: Rules) -> Opened:
    """Parse one request and open its images' headers. A v2 pixel tensor is already an image: it is only checked
    against the model's input. Raises InputError for a request answered on its own."""
    request = payload.parse(row, rules.limits)
    topk = request_topk(request, headers, rules)
    if explain and not rules.can_explain:
        raise InputError("explanations need Captum, which this server does not have; /predictions answers the "
                         "same request", status=501, error_type="NotImplemented")
    if explain and len(request.items) > rules.limits.max_explain_images:
        raise InputError(f"an explanation costs {rules.explain_steps} forward and backward passes per image; the "
                         f"limit is {rules.limits.max_explain_images} images per explanation request, this one holds "
                         f"{len(request.items)}", status=413, error_type="RequestTooExpensive")
    spec, opened, cost = rules.spec, [], 0
    for item in request.items:
        check_shape(item, spec)
        with located(item.where):
            if item.pixels is not None:
                image = oip.to_pixels(item.pixels, spec.input_shape)
                pixels = image.shape[0] * image.shape[1]
            else:
                image, pixels = open_image(item.data, spec.image_size, spec.channels, rules.limits)
        opened.append((image, item.where))
        cost += pixels
    if cost > rules.limits.max_request_pixels:
        raise InputError(f"the request's {len(opened)} image(s) decode to {cost:,} pixels; the limit is "
                         f"{rules.limits.max_request_pixels:,} pixels per request (a JPEG counts at the reduced scale "
                         "it is decoded at): send fewer or smaller images", status=413,
                         error_type="RequestTooExpensive")
    return Opened(opened, request.form, topk, request.request_id, explain, cost)


def read(data: list[dict], open_row: Callable[[dict, int], Any]) -> list[Any]:
    """The first pass: per row what `open_row` makes of it (Opened, or DESCRIBE), or the InputError it answers
    with. One explanation per batch: a second answers 503 (a worker's work per batch stays bounded)."""
    plans: list[Any] = []
    explaining = False
    for idx, row in enumerate(data):
        try:
            plan = open_row(row, idx)
            if isinstance(plan, Opened) and plan.explain:
                if explaining:
                    plan = busy("this server-side batch already holds an explanation (one per batch)")
                explaining = True
            plans.append(plan)
        except InputError as exc:
            plans.append(detached(exc))
        except Exception as exc:  # a request shape no rule foresaw: still this request's problem alone
            logger.exception("request %d could not be read", idx)
            plans.append(detached(InputError(f"the request could not be read ({type(exc).__name__}); "
                                             f"{payload.EXPECTED}")))
    return plans


def decode(opened: list[tuple[Any, str]], spec: DatasetSpec) -> list[np.ndarray]:
    """The request's images as uint8 H×W×C arrays of the model's size (a v2 pixel tensor already is one)."""
    pixels = []
    for image, where in opened:
        if isinstance(image, np.ndarray):
            pixels.append(image)
            continue
        with located(where):
            pixels.append(decode_opened(image, spec.image_size, spec.channels, spec.light_on_dark))
    return pixels


def decode_within_budget(plans: list[Any], rules: Rules) -> tuple[list[np.ndarray], int | None]:
    """The second pass, cheapest request first, in place: each Opened plan becomes `payload.Planned` (its images
    decoded, at the returned list's `start`) or the InputError it answers with. Returns the images and the row of
    the explanation decoded, if any."""
    limits = rules.limits
    deadline = time.monotonic() + limits.batch_deadline_ms / 1000
    spent, decoded, explained = 0, False, None
    pixels: list[np.ndarray] = []
    for idx in sorted((i for i, plan in enumerate(plans) if isinstance(plan, Opened)), key=lambda i: plans[i].cost):
        plan: Opened = plans[idx]
        if decoded and time.monotonic() > deadline:
            plans[idx] = busy(f"this server-side batch ran past its {limits.batch_deadline_ms} ms deadline before "
                              "reaching the request")
            continue
        if decoded and spent + plan.cost > limits.max_batch_pixels:
            plans[idx] = busy(f"the server-side batch this request joined has no decoding budget left "
                              f"({limits.max_batch_pixels:,} pixels per batch)")
            continue
        decoded = True
        try:
            images = decode(plan.images, rules.spec)
        except InputError as exc:
            plans[idx] = detached(exc)
            continue
        spent += plan.cost
        plans[idx] = payload.Planned(len(pixels), len(images), plan.form, plan.k, plan.request_id, plan.explain)
        pixels.extend(images)
        if plan.explain:
            explained = idx
    return pixels, explained
