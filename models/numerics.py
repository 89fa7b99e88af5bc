"""How a worker runs its network on this host: the numeric mode, chosen by measurement at start-up.

The right mode depends on the CPU, and this project's hosts change: on an Intel Xeon with AMX, bf16 autocast
with channels_last ran cifar10 2.0 3.2× faster than fp32; on an AMD EPYC (Zen 3, AVX2 only) bf16 is emulated and
ran 5-12× slower, while fp32 channels_last ran 1.6× faster than plain fp32. So a worker times the candidate
modes on its own host and serves with the fastest one whose top-1 agrees with fp32 on the reference images
shipped in the archive. Shipped inside every archive, so it imports nothing but torch and numpy.

Modes:
    fp32      contiguous NCHW float32: the reference every other mode is checked against;
    fp32-cl   float32 in channels_last (NHWC) memory format: oneDNN's blocked kernels, same arithmetic;
    bf16      channels_last under bfloat16 autocast: a candidate only where the hardware computes bf16 natively
              (AMX or AVX512-BF16 on a CPU, a CUDA device that supports it); logits come back as float32;
    ort-fp32, ort-int8
              ONNX Runtime on the archive's ONNX files (models/onnx_runtime.py), on a CPU where onnxruntime
              imports: candidates only when the build measured them on the validation split.

The rule, in full: a mode is served only if its top-1 agrees with fp32's on at least MIN_AGREEMENT of the
reference images (checked here, on this host's kernels) and, for a mode whose arithmetic differs from fp32's (the
ORT modes, int8 above all), its accuracy on the whole validation split, measured when the archive was built, is
within MAX_ACCURACY_DROP of fp32's; of those, the fastest that beats fp32 by more than MIN_GAIN. fp32-cl computes
fp32's arithmetic in another layout, and bf16's accuracy is not measured at build (emulated bf16 runs 5-12x slower
on the hosts without it): for both the agreement check is the rule.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from models import onnx_runtime

logger = logging.getLogger(__name__)

MODES = ("fp32", "fp32-cl", "bf16")  # torch's
ORT_MODES = tuple(onnx_runtime.FILES)
REQUESTS = ("auto", *MODES, *ORT_MODES)
MIN_AGREEMENT = 0.99  # top-1 agreement with fp32 on the reference images a mode needs to be served
MAX_ACCURACY_DROP = 0.003  # validation accuracy a mode may lose against fp32 (0.3 points), measured at build
MIN_GAIN = 1.05  # a mode replaces a more exact one only when faster by more than timing noise (5%)
TIMING_ROUNDS = 5  # interleaved rounds per candidate (see _images_per_s)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (None where the file or the line does not exist, e.g.
    macOS); read once per process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.split(":")[0].strip() == field),
                None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or "unknown"


def isa(flags: set[str] | None = None) -> list[str]:
    """The vector/matrix extensions that decide which mode is fast: what logs and benchmarks record."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in REPORTED_FLAGS if flag in flags]


def candidates(device: torch.device, flags: set[str] | None = None) -> tuple[str, ...]:
    """The modes worth timing on this device: bf16 only where it is computed natively."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = any(flag in (cpu_flags() if flags is None else flags) for flag in BF16_FLAGS)
    return MODES if native else MODES[:2]


class Runner(nn.Module):
    """The network run in one mode: float32 NCHW in, float32 logits out, whatever happens inside."""

    def __init__(self, model: nn.Module, mode: str, device: torch.device) -> None:
        super().__init__()
        if mode not in MODES:  # the ORT modes are onnx_runtime.OrtRunner
            raise ValueError(f"numerics must be one of {REQUESTS}, got {mode!r}")
        self.mode = mode
        self.device_type = device.type
        self.memory_format = torch.contiguous_format if mode == "fp32" else torch.channels_last
        self.model = model.to(device=device, memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.mode == "bf16"):
            return self.model(x).float()


@dataclass
class Choice:
    """What a worker serves with and why: shown in its log and in `python -m client versions`."""

    mode: str
    chosen_by: str  # "auto" (measured here) or "config" (handler.numerics in the model-config YAML)
    images_per_s: dict[str, float] = field(default_factory=dict)  # per candidate, at the worker's batch size
    agreement: dict[str, float] = field(default_factory=dict)  # top-1 agreement with fp32 on the reference set
    accuracy: dict[str, float] = field(default_factory=dict)  # validation accuracy at the served TTA level (build)
    refused: dict[str, str] = field(default_factory=dict)  # candidates not timed, and why
    seconds: float = 0.0
    isa: list[str] = field(default_factory=isa)
    batch_size: int = 0  # the server-side batch the candidates were timed at (the worker's, from TorchServe)
    # True in every worker but the one that measured (they serve its record): describe answers the same words
    # whichever worker a request reaches, so `client versions` says the same at every call.
    shared: bool = False

    def summary(self) -> str:
        timed = ", ".join(f"{mode} {rate:.0f} img/s" for mode, rate in self.images_per_s.items())
        agreed = ", ".join(f"{mode} {share:.1%}" for mode, share in self.agreement.items())
        timed = f"{timed} at batch {self.batch_size}" if timed else "not timed"
        accuracy = ", ".join(f"{mode} {share:.2%}" for mode, share in self.accuracy.items())
        refused = "".join(f"; {mode} not a candidate: {why}" for mode, why in self.refused.items())
        by = f"{self.chosen_by}, measured by the version's first worker" if self.shared else self.chosen_by
        return (f"numerics {self.mode} ({by}; {timed}; top-1 agreement with fp32: "
                f"{agreed or 'not checked'}; validation accuracy: {accuracy or 'not measured'}{refused}; "
                f"{self.seconds:.1f} s; ISA {' '.join(self.isa) or 'unknown'})")


def _images_per_s(runners: dict[str, Any], batch: torch.Tensor, seconds: float) -> dict[str, float]:
    """Images per second of each runner, for a one-thread worker on a CPU per second of its own CPU time: the
    candidates are measured while a version's other workers, and other versions', start beside this one, and on
    two cores a wall clock then mostly measures who else was running. Measured so, start-ups of `make bench` chose
    fp32 for cifar10 2.0 (1.7x slower than fp32-cl, whose wall-clock lead had shrunk to 6%) and for 1.0. The
    thread's CPU time leaves out the time it waited for a core. Each candidate gets `seconds` of wall time in
    TIMING_ROUNDS rounds taken in turn, and the best round counts, so what contention remains (caches, memory
    bandwidth) falls on every candidate alike. With several torch threads the work is spread over threads this
    clock does not see, and on a GPU the host thread waits: both use the wall clock."""
    thread_clock = batch.device.type == "cpu" and torch.get_num_threads() == 1
    best = dict.fromkeys(runners, 0.0)
    with torch.inference_mode():
        for runner in runners.values():
            runner(batch).cpu()  # first call: kernel selection and allocation, not timed
        for _ in range(TIMING_ROUNDS):
            for mode, runner in runners.items():
                done, wall, cpu = 0, time.perf_counter(), time.thread_time()
                while done == 0 or time.perf_counter() - wall < seconds / TIMING_ROUNDS:
                    runner(batch).cpu()  # .cpu() waits for a GPU to finish, so the time is the real time
                    done += len(batch)
                elapsed = time.thread_time() - cpu if thread_clock else time.perf_counter() - wall
                best[mode] = max(best[mode], done / max(elapsed, 1e-9))
    return best


AnyRunner = Union[Runner, onnx_runtime.OrtRunner]


def top1(runner: AnyRunner, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([runner(images[i:i + batch_size]).argmax(1).cpu()
                          for i in range(0, len(images), batch_size)])


@dataclass
class OnnxFiles:
    """The ORT modes an archive ships, as this worker may run them: `threads` intra-op threads (the worker's
    torch threads), judged at TTA level `tta` (the served level: accuracy with test-time augmentation is what
    clients get)."""

    model_dir: Path
    threads: int
    tta: int

    def candidates(self, device: torch.device) -> tuple[dict[str, Callable[[], onnx_runtime.OrtRunner]],
                                                         dict[str, float], dict[str, str]]:
        """(mode → a function that loads its session, mode → validation accuracy, mode → why it is not a
        candidate) under the accuracy rule."""
        shipped = onnx_runtime.shipped(self.model_dir)
        if not shipped:
            return {}, {}, {}
        if device.type != "cpu":
            return {}, {}, dict.fromkeys(shipped, f"ONNX Runtime runs on the CPU here, this worker on {device}")
        if onnx_runtime.onnxruntime_version() is None:
            return {}, {}, dict.fromkeys(shipped, "onnxruntime is not installed in this image")
        fp32 = (onnx_runtime.fp32_numbers(self.model_dir) or {}).get("levels", {}).get(str(self.tta))
        loaders, accuracy, refused = {}, {}, {}
        for mode, numbers in shipped.items():
            measured = numbers.get("levels", {}).get(str(self.tta))
            if fp32 is None or measured is None:
                refused[mode] = f"its validation accuracy at tta {self.tta} was not measured when the archive was built"
                continue
            accuracy[mode] = measured["accuracy"]
            if measured["accuracy"] < fp32["accuracy"] - MAX_ACCURACY_DROP - 1e-9:
                refused[mode] = (f"validation accuracy {measured['accuracy']:.2%} against fp32's "
                                 f"{fp32['accuracy']:.2%} (at most {MAX_ACCURACY_DROP:.1%} lower)")
                continue
            loaders[mode] = functools.partial(onnx_runtime.OrtRunner, mode,
                                              self.model_dir / onnx_runtime.FILES[mode], self.threads)
        return loaders, accuracy, refused


def choose(model: nn.Module, device: torch.device, requested: str, reference: torch.Tensor, batch_size: int,
           seconds: float = 0.3, expected: torch.Tensor | None = None,
           onnx: OnnxFiles | None = None) -> tuple[AnyRunner, Choice]:
    """The runner to serve with: `requested` as configured, or for "auto" the fastest candidate (faster than fp32
    by more than MIN_GAIN, else fp32 itself) whose top-1 agrees with fp32 on at least MIN_AGREEMENT of `reference`
    (normalised float images); the ORT modes of `onnx` are candidates if their validation accuracy passes the rule.
    Timed on batches of `batch_size`, the worker's server-side batch. `expected`: fp32's top-1 for `reference` when
    the archive ships it (computed when it was built), else computed here."""
    if requested not in REQUESTS:
        raise ValueError(f"handler.numerics must be one of {REQUESTS}, got {requested!r}")
    start = time.perf_counter()
    loaders, accuracy, refused = onnx.candidates(device) if onnx is not None else ({}, {}, {})
    if requested != "auto":
        if requested in MODES:
            return Runner(model, requested, device), Choice(requested, "config", batch_size=batch_size)
        # A configured ORT mode is the operator's decision, the accuracy rule notwithstanding; only a worker that
        # cannot run it (no onnxruntime, a GPU, an archive without the file) serves fp32, and says why.
        why = refused.get(requested, "the archive has no ONNX files (built before ONNX Runtime modes)")
        if requested in loaders or (requested in accuracy and device.type == "cpu"):
            runner = onnx_runtime.OrtRunner(requested, onnx.model_dir / onnx_runtime.FILES[requested], onnx.threads)
            return runner, Choice(requested, "config", accuracy=accuracy, refused=refused, batch_size=batch_size)
        logger.warning("handler.numerics is %s, which this worker cannot run (%s): serving fp32", requested, why)
        return Runner(model, "fp32", device), Choice("fp32", f"config asked for {requested}, unavailable: {why}",
                                                     refused={requested: why}, batch_size=batch_size)
    batch = reference[:batch_size].to(device)
    runners: dict[str, AnyRunner] = {mode: Runner(copy.deepcopy(model), mode, device) for mode in candidates(device)}
    runners.update({mode: load() for mode, load in loaders.items()})
    rates = _images_per_s(runners, batch, seconds)
    choice = Choice("fp32", "auto", {mode: round(rate, 1) for mode, rate in rates.items()}, accuracy=accuracy,
                    refused=refused, batch_size=batch_size)
    for mode in sorted(rates, key=rates.get, reverse=True):
        if mode == "fp32" or rates[mode] < MIN_GAIN * rates["fp32"]:
            break
        expected = top1(runners["fp32"], reference.to(device)) if expected is None else expected
        agreement = (top1(runners[mode], reference.to(device)) == expected).float().mean().item()
        choice.agreement[mode] = round(agreement, 4)
        if agreement >= MIN_AGREEMENT:
            choice.mode = mode
            break
    choice.seconds = round(time.perf_counter() - start, 2)
    return runners[choice.mode], choice  # the others' sessions and copies are freed with `runners`


def serve_as(mode: str, model: nn.Module, device: torch.device, onnx: OnnxFiles | None) -> AnyRunner:
    """The runner of a mode another worker of this version chose (choose_once)."""
    if mode in ORT_MODES and onnx is not None:
        return onnx_runtime.OrtRunner(mode, onnx.model_dir / onnx_runtime.FILES[mode], onnx.threads)
    return Runner(model, mode, device)


def choose_once(record: Path, model: nn.Module, device: torch.device, reference: torch.Tensor,
                batch_size: int, expected: torch.Tensor | None = None,
                onnx: OnnxFiles | None = None) -> tuple[AnyRunner, Choice]:
    """`choose(..., "auto", ...)` once per version and host: the first worker measures and writes `record` (in the
    model directory TorchServe unpacks once per version, under a file lock), the others serve the same mode. So
    every worker of a version answers with the same numerics, whichever one a request reaches, and a second
    worker's start-up costs no measuring. A record from another host, device, torch, onnxruntime, TTA level,
    set of ONNX files or batch size is measured again; a read-only model directory falls back to measuring in
    each worker."""
    key = {"cpu": cpu_model(), "isa": isa(), "device": str(device), "torch": torch.__version__,
           "onnxruntime": onnx_runtime.onnxruntime_version(), "tta": onnx.tta if onnx else None,
           "onnx_modes": sorted(onnx_runtime.shipped(onnx.model_dir)) if onnx else [],
           "batch_size": batch_size, "reference_images": len(reference)}
    try:
        lock = open(record.with_name(record.name + ".lock"), "a")
    except OSError:
        return choose(model, device, "auto", reference, batch_size, expected=expected, onnx=onnx)
    with lock:  # closing it releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(record.read_text())
            if saved["key"] == key:
                choice = Choice(**saved["choice"])
                choice.shared = True
                return serve_as(choice.mode, model, device, onnx), choice
        runner, choice = choose(model, device, "auto", reference, batch_size, expected=expected, onnx=onnx)
        with contextlib.suppress(OSError):
            record.write_text(json.dumps({"key": key, "choice": asdict(choice)}))
        return runner, choice


def load_reference(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The reference images (uint8 N×C×H×W), their true labels, and fp32's top-1 for them where an archive's copy
    records it (serving/archive.py adds it at build time, so a worker need not run fp32 over them)."""
    with np.load(path) as data:
        fp32_top1 = torch.from_numpy(data["fp32_top1"]) if "fp32_top1" in data else None
        return torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]), fp32_top1
