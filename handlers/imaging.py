"""Turning untrusted request bytes into the uint8 pixels a model expects, or into a precise client error.

Everything here is a function (plus one exception type) so the handler files can each keep exactly one class,
which TorchServe requires. Any failure caused by the input raises `InputError`, which the handler turns into a
per-item 4xx response; nothing here may let a bad image kill a worker.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow refuses images above its own bomb limit with an exception type we handle anyway; our limit is lower and
# checked from the header alone, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None

_DATA_URL = re.compile(rb"^\s*data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_BASE64_TEXT = re.compile(rb"^[A-Za-z0-9+/=_\-\s]+$")


class InputError(Exception):
    """A request answered on its own: the HTTP status and a message that says what is accepted.

    Mostly the client's to fix (4xx). 503 with `retry_after` means the request was fine but the server-side
    batch it landed in had no budget or time left for it: the same request succeeds when sent again.
    """

    PHRASES = {400: "Bad Request", 413: "Payload Too Large", 501: "Not Implemented", 503: "Service Unavailable"}

    def __init__(self, message: str, status: int = 400, error_type: str = "InvalidInput",
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.retry_after = retry_after

    @property
    def phrase(self) -> str:
        return self.PHRASES[self.status]

    def body(self) -> dict:
        return {"code": self.status, "type": self.error_type, "message": self.message}

    def at(self, where: str) -> InputError:
        """The same error, its message prefixed with where in the request it happened (`data[2]`)."""
        return InputError(f"{where}: {self.message}", self.status, self.error_type, self.retry_after)


@dataclass(frozen=True)
class Limits:
    """What one request, and one server-side batch, may cost; documented in docs/serving.md and configurable in the
    archive's model-config YAML.

    Decoding costs CPU in proportion to the pixels decoded (measured 11-51 ns per pixel across PNG, WebP, GIF
    and TIFF, an RGBA PNG the worst, on this project's 2-core AMD EPYC host; a JPEG is decoded at 1/2-1/8 scale
    in draft mode and counted at that scale). Pixel budgets are checked from the image headers before anything
    is decoded; docs/serving.md has the arithmetic.
    """

    max_bytes: int = 768 * 1024  # the most a 1 MiB request (max_request_size) carries as base64
    max_pixels: int = 4096 * 4096  # per image, as its header declares it (decompression bombs)
    min_side: int = 8
    max_images: int = 64
    max_request_pixels: int = 12_000_000  # per request, summed over its images: ≤ 0.61 s at the worst 51 ns/pixel
    max_batch_pixels: int = 24_000_000  # per server-side batch; rows past it answer 503 + Retry-After
    batch_deadline_ms: int = 10_000  # rows not started by then answer 503; well inside responseTimeout (30 s)
    max_explain_images: int = 4  # per /explanations request: Integrated Gradients costs `explain_steps` passes


def check_image_count(count: int, limits: Limits) -> None:
    """Refuse a client-side batch over the limit before decoding any of it."""
    if count > limits.max_images:
        raise InputError(f"the request holds {count} images; the limit is {limits.max_images} per request",
                         status=413, error_type="TooManyImages")


def decode_base64(text: str | bytes) -> bytes:
    """Strict base64 (standard or URL-safe alphabet), with or without a `data:image/...;base64,` prefix."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    raw = _DATA_URL.sub(b"", raw, count=1)
    compact = re.sub(rb"\s+", b"", raw)
    if not compact:
        raise InputError("the base64 string is empty; send a base64-encoded image", error_type="InvalidBase64")
    try:
        if b"-" in compact or b"_" in compact:
            return base64.b64decode(compact.translate(bytes.maketrans(b"-_", b"+/")), validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"invalid base64 ({exc}); send the image bytes base64-encoded, optionally as a "
                         "data:image/...;base64, URL", error_type="InvalidBase64") from None


def looks_like_base64(raw: bytes) -> bool:
    """True for a body that is base64 text rather than image bytes (no image format starts this way)."""
    head = raw[:256]
    return bool(_DATA_URL.match(head)) or bool(_BASE64_TEXT.match(head))


def _sample_range(mode: str, samples: np.ndarray) -> float:
    """The value a single-channel image's white has. 16-bit modes: 65535. 32-bit integers ('I'): 255 unless a
    sample exceeds it, then 65535. 32-bit floats ('F', e.g. a float TIFF): 1.0, the convention of float images and
    of this server's v2 FP32 tensors, unless a sample exceeds 1 (a float image of 0-255 values, or above 255 of
    0-65535 ones)."""
    if mode.startswith("I;16"):
        return 65535.0
    peak = float(samples.max(initial=0))
    if mode == "F" and peak <= 1.0:
        return 1.0
    return 65535.0 if peak > 255 else 255.0


def _to_gray_or_rgb(image: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode → 'L' or 'RGB'. Transparent pixels become white, 16-bit samples are scaled, not clipped,
    float samples are read as 0-1 (`_sample_range`)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        samples = np.array(image, dtype=np.float32)  # a copy: exact for 16-bit samples, half float64's cost
        np.nan_to_num(samples, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # a float image may hold them
        top = _sample_range(image.mode, samples)
        samples *= np.float32(255.0 / top)
        samples += np.float32(0.5)
        image = Image.fromarray(np.clip(samples, 0, 255, out=samples).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def open_image(data: bytes, size: int, channels: int, limits: Limits) -> tuple[Image.Image, int]:
    """Read only the image's header: check its size against the limits and return the opened image with the
    pixels decoding it will cost (for a JPEG, at the reduced scale draft mode decodes it at)."""
    if not data:
        raise InputError("the image is empty (0 bytes); send PNG, JPEG, BMP, GIF, WebP or TIFF bytes",
                         error_type="EmptyInput")
    if len(data) > limits.max_bytes:
        raise InputError(f"the image is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes per image",
                         status=413, error_type="ImageTooLarge")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InputError(f"the image header says {width}×{height} = {width * height:,} pixels; the limit "
                                 f"is {limits.max_pixels:,} pixels", status=413, error_type="ImageTooLarge")
            if min(width, height) < limits.min_side:
                raise InputError(f"the image is {width}×{height}; the smallest accepted side is "
                                 f"{limits.min_side} pixels", error_type="ImageTooSmall")
            if image.format == "JPEG":
                image.draft("L" if channels == 1 else "RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale
    except InputError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt input; all of them are the client's to fix.
        raise _undecodable(exc) from None
    return image, image.size[0] * image.size[1]


def decode_opened(image: Image.Image, size: int, channels: int, light_on_dark: bool = False) -> np.ndarray:
    """An image from `open_image` → uint8 array (size, size, channels), as training saw them.

    Non-square images are centre-cropped to a square, then resized (Pillow's bilinear filter, which
    antialiases when shrinking). For `light_on_dark` data sets (MNIST) an image whose border is mostly light,
    a dark digit on paper, is inverted to MNIST's light ink on a dark background.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            image = ImageOps.exif_transpose(image) or image
            image = _to_gray_or_rgb(image, channels)
            if image.size != (size, size):
                image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except Exception as exc:
        raise _undecodable(exc) from None
    if channels == 1:
        pixels = pixels[:, :, None]
        if light_on_dark and _border_is_light(pixels):
            pixels = 255 - pixels
    return pixels


def decode_image(data: bytes, size: int, channels: int, limits: Limits, light_on_dark: bool = False) -> np.ndarray:
    """Image bytes in any format Pillow reads → uint8 array (size, size, channels): `open_image` then
    `decode_opened`, for callers that budget one image at a time."""
    image, _ = open_image(data, size, channels, limits)
    return decode_opened(image, size, channels, light_on_dark)


def _undecodable(exc: Exception) -> InputError:
    reason = ("no image format recognised" if isinstance(exc, UnidentifiedImageError)
              else f"{type(exc).__name__}: {exc}")
    return InputError(f"not a decodable image ({reason}); send PNG, JPEG, BMP, GIF, WebP or TIFF bytes",
                      error_type="InvalidImage")


def _border_is_light(pixels: np.ndarray) -> bool:
    """The background's brightness, judged from the outermost 2-pixel ring, where a centred digit never is."""
    ring = np.concatenate([pixels[:2].ravel(), pixels[-2:].ravel(), pixels[:, :2].ravel(), pixels[:, -2:].ravel()])
    return float(ring.mean()) > 127.5
