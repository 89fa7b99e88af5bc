"""Reading TorchServe's logs during a start: only what this start wrote, and a failed worker's own traceback.

The logs are append-only and may hold failures from an earlier day, so a start marks where each file ends and
judges only the lines written after; a worker that dies prints its traceback through java's log, interleaved
with every other worker's lines, so the traceback is picked out by the worker's thread name.
"""
from __future__ import annotations

import re
from pathlib import Path

# Lines of TorchServe's own log that mean start-up cannot succeed, whoever wrote them.
SERVER_FAILURES = ("Address already in use", "BindException", "Invalid model archive", "ModelNotFoundException",
                   "Failed to load model")
# Lines a worker thread (`W-<port>-<model>_<version>`) writes when its Python process died or cannot load.
WORKER_FAILURES = ("Load model failed", "Backend worker process died", "Retry worker")
WORKER_THREAD = re.compile(r"\bW-(?P<port>\d+)-(?P<model>\S+)_(?P<version>[^\s_]+?)(?:-(?:stdout|stderr))?\s")
LOG_LINE = re.compile(r"^\S+ \[\s*\w+\s*\] (?P<thread>\S+) (?P<logger>\S+) - (?P<message>.*)$")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*")
BIND_FAILURES = ("Address already in use", "BindException")


class LogReader:
    """Reads only what TorchServe's append-only logs gained since `mark()`, a few new bytes per poll.

    `make serve` must judge this start-up alone: a failure written on an earlier day must not count, and a
    large `ts_log.log` must not be re-read every half second.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}
        self.lines: dict[Path, list[str]] = {path: [] for path in paths}

    def mark(self) -> None:
        """From now on: remember where each file ends and forget what was read."""
        for path in self.paths:
            self.offsets[path] = path.stat().st_size if path.exists() else 0
            self.partial[path] = b""
            self.lines[path] = []

    def poll(self) -> list[str]:
        """The complete lines written since the last poll (all files; a rotated file is read from its start)."""
        new: list[str] = []
        for path in self.paths:
            if not path.exists():
                continue
            offset = self.offsets.get(path, 0)
            if path.stat().st_size < offset:  # rotated or truncated: the new file is all new
                offset, self.partial[path] = 0, b""
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            self.offsets[path] = offset + len(chunk)
            *complete, rest = (self.partial.get(path, b"") + chunk).split(b"\n")
            self.partial[path] = rest
            decoded = [line.decode(errors="replace") for line in complete]
            self.lines[path].extend(decoded)
            new.extend(decoded)
        return new

    def tail(self, count: int) -> str:
        parts = [f"--- {path} (last {min(count, len(lines))} lines of this start) ---\n" + "\n".join(lines[-count:])
                 for path, lines in self.lines.items() if lines]
        return "\n".join(parts) or "(nothing written to the logs during this start)"


def worker_of(line: str) -> tuple[str, str] | None:
    """`(model/version, worker port)` for a line a worker thread wrote, else None."""
    match = WORKER_THREAD.search(line)
    return (f"{match['model']}/{match['version']}", match["port"]) if match else None


def worker_traceback(lines: list[str], port: str) -> list[str]:
    """The Python traceback one worker printed, from the lines that belong to it alone (other workers' lines
    interleave in model_log.log). Frames inside importlib and caret markers are dropped: they say nothing."""
    own = []
    for line in lines:
        parsed = LOG_LINE.match(line)
        if parsed and parsed["thread"].startswith(f"W-{port}-") and parsed["thread"].endswith(("-stdout", "-stderr")):
            own.append(parsed["message"])
    start = next((i for i, message in enumerate(own) if message.startswith("Traceback (most recent call last)")),
                 None)
    if start is None:
        return []
    block = own[start:]
    last = max((i for i, message in enumerate(block) if EXCEPTION_LINE.match(message)), default=None)
    block = block[:last + 1] if last is not None else block
    return [m for m in block if "<frozen importlib" not in m and not re.fullmatch(r"\s*[\^~]+\s*", m)]

