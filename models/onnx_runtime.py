"""The network as ONNX Runtime runs it: the `ort-*` numeric modes a CPU worker may choose (models/numerics.py).

`make archive` exports each network to ONNX with its BatchNorm folded, quantizes it to int8 and measures both
files on the validation split (serving/quantize.py); a worker only loads them, times them and checks their top-1
against fp32 on the reference images.

Modes (FILES): ort-fp32 (float32) and ort-int8: uint8 activations × int8 weights, per channel, the first
convolution left in float32. The weights use 7 of their 8 bits (`reduce_range`): on a CPU without VNNI or AMX
(AVX2, AVX-512 without VNNI) ONNX Runtime sums pairs of uint8 × int8 products in 16 bits, which saturates with
full-range weights (measured on an AMD EPYC with AVX2 only: top-1 agreement with fp32 57.9%) and cannot with
7-bit ones; with VNNI or AMX the sums are 32-bit either way. So one int8 file computes the same integers on every
x86 CPU, and the accuracy the build measured holds on the host that serves it. Shipped inside every archive;
onnxruntime is imported only when a worker asks for it, and an image without it serves the torch modes and logs
why.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FILES = {"ort-fp32": "model.onnx", "ort-int8": "model.int8.onnx"}
NUMBERS_FILE = "numerics.json"  # what the build measured: per mode, validation accuracy and temperatures
INPUT, OUTPUT = "images", "logits"


def onnxruntime_version() -> str | None:
    """onnxruntime's version, or None where it cannot be imported (the KServe images ship without it)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def session(path: Path, threads: int) -> Any:
    """An InferenceSession on the CPU with `threads` intra-op threads and no inter-op pool (a worker is one of
    several processes sharing the cores). With one thread ONNX Runtime computes on the calling thread, so the
    worker's CPU-time measure sees its work."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers are the exporter's, not the worker's
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtRunner:
    """One ONNX file run like models.numerics.Runner: float32 NCHW in, float32 logits out (a torch tensor)."""

    memory_format = torch.contiguous_format

    def __init__(self, mode: str, path: Path, threads: int) -> None:
        self.mode = mode
        self.path = path
        self.session = session(path, threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: array})[0])


def numbers(model_dir: Path) -> dict:
    """The archive's numerics.json ({} for an archive built before it)."""
    numbers_file = model_dir / NUMBERS_FILE
    return json.loads(numbers_file.read_text()) if numbers_file.is_file() else {}


def shipped(model_dir: Path) -> dict[str, dict]:
    """The ORT modes an archive ships (file present and measured at build): mode → its numbers from
    numerics.json. Empty for an archive built before them."""
    return {mode: entry for mode, entry in numbers(model_dir).get("modes", {}).items()
            if mode in FILES and (model_dir / FILES[mode]).is_file()}


def fp32_numbers(model_dir: Path) -> dict | None:
    """fp32's validation numbers as the build measured them (the bar an ORT mode's accuracy is held to)."""
    return numbers(model_dir).get("modes", {}).get("fp32")
