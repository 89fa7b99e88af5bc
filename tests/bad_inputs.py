"""A corpus of hostile, broken and odd requests, each with the status and message it must get.

Every entry is sent over HTTP by tests/integration/test_reliability.py (and by the soak). 4xx answers must be
JSON `{"code", "type", "message"}` with `message` containing the text given here; the worker must survive.
The odd-but-valid images (16-bit, CMYK, palette, animated GIF, huge top-k) must answer 200.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tests import images
from tests.images import b64


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    message: str = ""  # a substring of the answer's "message" (4xx only)
    body: bytes | str | None = None
    json_body: object = None
    files: dict | None = None
    headers: dict = field(default_factory=dict)
    labels: int | None = None  # for a 200: how many labels the answer must hold (the top-k it was clamped to)

    def request_kwargs(self) -> dict:
        kwargs: dict = {"headers": dict(self.headers)}
        if self.json_body is not None:
            kwargs["data"] = json.dumps(self.json_body).encode()
            kwargs["headers"].setdefault("Content-Type", "application/json")
        elif self.files is not None:
            kwargs["files"] = self.files
        else:
            kwargs["data"] = self.body if self.body is not None else b""
        return kwargs


def _cmyk_jpeg() -> bytes:
    return images.encode(images.noise(32, 32).convert("CMYK"), "JPEG")


def _sixteen_bit_png() -> bytes:
    return images.encode(Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60))


def _big_png(megabytes: float) -> bytes:
    """Incompressible noise whose PNG encoding is about `megabytes` long."""
    side = int((megabytes * 1024 * 1024 / 3) ** 0.5)
    return images.encode(images.noise(side, side, seed=7))


PNG = images.encode(images.noise(32, 32))
JPEG = images.encode(images.noise(64, 48), "JPEG", quality=90)
CT_JSON = {"Content-Type": "application/json"}
CT_TEXT = {"Content-Type": "text/plain"}


def corpus() -> list[Case]:
    nested = "[" * 100_000 + "]" * 100_000
    b64_png = b64(PNG)
    deep_list: object = b64_png
    for _ in range(50):
        deep_list = [deep_list]
    return [
        # bodies that are not images
        Case("empty body", 400, "empty", body=b""),
        Case("truncated PNG header", 400, "not a decodable image", body=PNG[:60]),
        Case("truncated PNG half", 400, "not a decodable image", body=PNG[: len(PNG) // 2]),
        Case("truncated JPEG header", 400, "not a decodable image", body=JPEG[:100]),
        Case("truncated JPEG half", 400, "not a decodable image", body=JPEG[: len(JPEG) // 2]),
        Case("truncated BMP", 400, "not a decodable image", body=images.encode(images.noise(32, 32), "BMP")[:200]),
        Case("truncated WebP", 400, "not a decodable image", body=images.encode(images.noise(32, 32), "WEBP")[:40]),
        Case("TIFF header then junk", 400, "not a decodable image", body=b"II*\x00" + b"\x07" * 200),
        Case("random bytes 1 KB", 400, "not a decodable image", body=np.random.default_rng(1).bytes(1024)),
        Case("random bytes 100 KB", 400, "not a decodable image", body=np.random.default_rng(2).bytes(100_000)),
        Case("SVG", 400, "not a decodable image",
             body=b"<svg xmlns='http://www.w3.org/2000/svg' width='32' height='32'/>",
             headers={"Content-Type": "image/svg+xml"}),
        Case("plain text", 400, "base64", body="hello world, this is not an image", headers=CT_TEXT),
        Case("plain text without content type", 400, "not a decodable image", body=b"hello; not an image!"),
        Case("HTML", 400, "invalid base64", body=b"<html><body>hi</body></html>",
             headers={"Content-Type": "text/html"}),
        # decompression bombs and sizes
        Case("PNG header claims 50000x50000", 413, "50000×50000", body=images.png_claiming(50_000, 50_000)),
        Case("PNG header claims 5000x5000", 413, "limit is 16,777,216 pixels", body=images.png_claiming(5000, 5000)),
        Case("PNG header claims 100000x1", 400, "smallest accepted side", body=images.png_claiming(100_000, 1)),
        Case("1x1 image", 400, "smallest accepted side", body=images.encode(images.noise(1, 1))),
        Case("4x4 image", 400, "smallest accepted side", body=images.encode(images.noise(4, 4))),
        Case("image over max_bytes", 413, "limit is 786,432 bytes", body=_big_png(0.8)),
        # Refused by TorchServe's frontend before any handler runs: status only, its body is not ours.
        Case("body over max_request_size", 413, body=b"\x00" * (7 * 1024 * 1024)),
        # odd but valid images
        Case("16-bit grayscale PNG", 200, body=_sixteen_bit_png()),
        Case("CMYK JPEG", 200, body=_cmyk_jpeg()),
        Case("palette PNG", 200, body=images.encode(images.noise(32, 32).convert("P"))),
        Case("animated GIF", 200, body=images.animated_gif()),
        Case("RGBA PNG", 200, body=images.encode(images.noise(32, 32, "RGBA"))),
        Case("huge topk is clamped", 200, json_body={"data": b64_png, "topk": 10**9}, labels=10),
        # base64
        Case("base64 bad padding", 400, "Incorrect padding", json_body={"data": "abcdef"}),
        Case("base64 bad characters", 400, "invalid base64", json_body={"data": "@@@@####"}),
        Case("base64 of text", 400, "not a decodable image", json_body={"data": b64(b"just text")}),
        Case("base64 empty string", 400, "base64 string is empty", json_body={"data": ""}),
        Case("data URL with junk", 400, "invalid base64", body="data:image/png;base64,%%%%", headers=CT_TEXT),
        Case("base64 text bad length", 400, "invalid base64", body="abcde", headers=CT_TEXT),
        # JSON of the wrong type or shape
        Case("JSON data is a number", 400, "must be a base64 string", json_body={"data": 5}),
        Case("JSON data is null", 400, "must be a base64 string", json_body={"data": None}),
        Case("JSON data is a nested list", 400, "data[0] must be a base64 string", json_body={"data": [[b64_png]]}),
        Case("JSON data object without data", 400, "data.data must be a base64 string", json_body={"data": {"x": 1}}),
        Case("JSON array of numbers", 400, "body[0] must be a base64 string", json_body=[1, 2, 3]),
        Case("JSON string (read as base64)", 400, "invalid base64", json_body="abc"),
        Case("JSON number", 400, "JSON body must be an object", json_body=42),
        Case("JSON null", 400, "JSON body must be an object", body=b"null", headers=CT_JSON),
        Case("JSON without data", 400, 'no "data" or "instances"', json_body={"image": b64_png}),
        Case("JSON empty object", 400, 'no "data" or "instances"', json_body={}),
        Case("JSON empty list", 400, "empty list", json_body={"data": []}),
        Case("JSON huge array", 413, "limit is 64 per request", json_body={"data": ["x"] * 10_000}),
        Case("JSON deep nesting unparseable", 400, "does not parse", body=nested.encode(), headers=CT_JSON),
        Case("JSON deep nesting parseable", 400, "must be a base64 string", json_body={"data": deep_list}),
        Case("JSON unicode data", 400, "invalid base64", json_body={"data": "ünïcødé ☃"}),
        Case("JSON unicode key", 400, 'no "data" or "instances"', json_body={"dätä☃": b64_png}),
        Case("JSON invalid UTF-8", 400, "does not parse", body=b'{"data": "\xff\xfe"}', headers=CT_JSON),
        Case("JSON syntax error", 400, "does not parse", body=b'{"data": ', headers=CT_JSON),
        Case("JSON batch with one bad image", 400, "data[1]", json_body={"data": [b64_png, "!!!!"]}),
        # the seeds' envelope
        Case("envelope shape for MNIST", 400, "expects [3, 32, 32]",
             json_body={"data": [{"content_type": "image/png", "data": b64_png, "shape": [1, 28, 28]}]}),
        Case("envelope shape too large", 400, "expects [3, 32, 32]",
             json_body={"data": [{"content_type": "image/png", "data": b64_png, "shape": [3, 64, 64]}]}),
        Case("envelope shape is a string", 400, 'shape is "3x32x32"',
             json_body={"data": [{"data": b64_png, "shape": "3x32x32"}]}),
        Case("envelope text content type", 400, "must be an image type",
             json_body={"data": [{"content_type": "text/plain", "data": b64_png}]}),
        Case("envelope without data", 400, "must be a base64 string", json_body={"data": [{"shape": [3, 32, 32]}]}),
        # KServe v1
        Case("KServe instances not a list", 400, '"instances" must be a non-empty list', json_body={"instances": 1}),
        Case("KServe instances empty", 400, '"instances" must be a non-empty list', json_body={"instances": []}),
        Case("KServe b64 not a string", 400, "instances[0] must be", json_body={"instances": [{"b64": 5}]}),
        # top-k
        Case("topk negative", 400, "positive integer", json_body={"data": b64_png, "topk": -1}),
        Case("topk zero", 400, "positive integer", json_body={"data": b64_png, "topk": 0}),
        Case("topk string", 400, "positive integer", json_body={"data": b64_png, "topk": "five"}),
        Case("topk NaN", 400, "positive integer", body=('{"data": "%s", "topk": NaN}' % b64_png).encode(),
             headers=CT_JSON),
        Case("topk fraction", 400, "positive integer", json_body={"data": b64_png, "topk": 2.5}),
        Case("topk boolean", 400, "positive integer", json_body={"data": b64_png, "topk": True}),
        Case("topk header negative", 400, "x-topk header", body=PNG, headers={"X-TopK": "-3"}),
        # multipart
        Case("multipart without an image", 400, "holds no image", files={"topk": (None, "3")}),
        Case("multipart empty file", 400, "empty", files={"data": ("a.png", b"", "image/png")}),
    ]


CASES = corpus()
