"""A stand-in network whose cost and answer depend on the numeric mode it runs in, so a test can pin which mode
must win without depending on a CPU's kernels. It is also staged into a copy of a real archive as that archive's
network (tests/test_numerics.py), so it is one nn.Module class, built with no arguments there, importing only torch.
"""
import time

import torch
from torch import nn

# CPU seconds per call in each mode: fp32-cl 1.5x faster than fp32, bf16 slowest (never the right choice). With
# the default 25 ms wait per call, fp32-cl's lead on the wall clock is 28/27 = 1.04x, under MIN_GAIN (1.05).
CONTENDED = {"fp32": 0.0030, "fp32-cl": 0.0020, "bf16": 0.0035}


def busy(seconds: float) -> None:
    """Compute for `seconds` of this thread's CPU time."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def mode_of(x: torch.Tensor) -> str:
    """The mode models/numerics.py's Runner is calling in: bf16 autocast, channels_last input, or plain NCHW."""
    try:
        autocast = torch.is_autocast_enabled("cpu")
    except TypeError:  # torch before 2.4 has no device argument
        autocast = torch.is_autocast_cpu_enabled()
    if autocast:
        return "bf16"
    return "fp32-cl" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else "fp32"


class StandIn(nn.Module):
    """Each call costs `seconds[mode]` of CPU and first waits `wait` seconds for a core that other processes hold
    (a sleep: time passes, nothing is computed here), as a version's first worker does while the others start on a
    2-core host. Every mode answers fp32's logits, except fp32-cl where `cl_agrees` is false (rolled logits)."""

    def __init__(self, features: int = 3 * 32 * 32, seconds: dict | None = None, wait: float = 0.025,
                 cl_agrees: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 10)
        self.seconds = dict(seconds or CONTENDED)
        self.wait = wait
        self.cl_agrees = cl_agrees

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = mode_of(x)
        if self.wait:
            time.sleep(self.wait)
        busy(self.seconds[mode])
        logits = self.linear(x.flatten(1).float()).float()
        return logits.roll(1, dims=1) if mode == "fp32-cl" and not self.cl_agrees else logits
