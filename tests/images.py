"""Image bytes for tests, written with Pillow in every format and mode the handlers must accept or refuse."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **params) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-sized image whose encoding is small (gradients, which PNG's filters and JPEG both compress to tens
    of kB): every pixel must still be decoded, so pixel budgets, not the handler's max_bytes, decide."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y + seed) % 256], -1)
    return Image.fromarray(pixels.astype(np.uint8))


def digit(size: int = 28, dark_on_light: bool = False) -> np.ndarray:
    """A plain '1'-like stroke: light ink on black, as MNIST stores digits (or inverted, as paper shows them)."""
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[size // 5: size - size // 5, size // 2 - size // 14: size // 2 + size // 14 + 1] = 255
    return 255 - pixels if dark_on_light else pixels


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height while its data is tiny: a decompression bomb's signature."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def animated_gif(width: int = 32, height: int = 32) -> bytes:
    frames = [noise(width, height, seed=i).convert("P") for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()
