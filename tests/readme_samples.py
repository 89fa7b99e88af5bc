"""The README's sample outputs, made by running its commands against a real TorchServe and kept equal by a test.

A fenced block right after a `<!-- sample -->` line holds `$ command` lines (a trailing `\\` continues one), each
followed by what it prints. `<!-- sample: make serve -->` is the banner `make serve` prints
(`serving.server.banner`). Commands run as written from the repository root, with `http://127.0.0.1:8080` and the
client's default addresses pointed at the server given.

    python -m tests.readme_samples --write    # a TorchServe on free ports from model_store/ (make archive first)

rewrites every sample, and `tests/readme_samples.json` records the host and the numerics each version served
with. `tests/integration/test_readme.py` runs the commands again and compares (`same_text`): text equal once
process ids, timings and the numerics a worker chose are masked, every number within a tolerance: 1e-5 plus one
unit of its last printed digit where every version serves in the recorded numerics (answers are the same
kernels' on the same input then: tests/answers.py), else 1e-2 (a worker on another host may choose another mode:
on the four example images fp32, fp32-cl, bf16, ONNX Runtime fp32 and int8 differ by at most 1.8e-3, bf16 on
cifar10 1.0, measured on an AMD EPYC with AVX512-BF16; 1e-2 is 5 times that, and any other image or model moves
the top probabilities by far more).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.catalog import ROOT

README = ROOT / "README.md"
RECORD = Path(__file__).with_name("readme_samples.json")
MARK = re.compile(r"^<!-- sample(?:: (?P<kind>[a-z ]+))? -->$")
SAME_MODE_TOLERANCE = 1e-5
OTHER_MODE_TOLERANCE = 1e-2
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
MASKS = [(re.compile(r"\b\d+:READY\b"), "PID:READY"),
         (re.compile(r"numerics \S+ \(.*\)$", re.MULTILINE), "numerics MODE (as the worker chose)"),
         (re.compile(r"up in \d+\.\d s"), "up in N s")]


@dataclass
class Sample:
    """One `$ command` of a sample block and the output lines the README shows for it."""

    command: str
    output: list[str]


@dataclass
class Block:
    kind: str  # "" for commands, "make serve" for the banner
    first: int  # index of the block's first line inside the fence
    last: int  # index of its closing fence
    samples: list[Sample]


def blocks(lines: list[str]) -> list[Block]:
    found = []
    for i, line in enumerate(lines):
        mark = MARK.match(line)
        if not mark:
            continue
        if not lines[i + 1].startswith("```"):
            raise ValueError(f"README line {i + 1}: a sample mark must be followed by a fenced block")
        last = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        found.append(Block(mark.group("kind") or "", i + 2, last, parse(lines[i + 2:last])))
    return found


def parse(body: list[str]) -> list[Sample]:
    samples: list[Sample] = []
    i = 0
    while i < len(body):
        if not body[i].startswith("$ "):
            if samples:
                samples[-1].output.append(body[i])
            i += 1
            continue
        command = [body[i][2:]]
        while command[-1].endswith("\\"):
            i += 1
            command.append(body[i])
        samples.append(Sample("\n".join(command), []))
        i += 1
    for sample in samples:
        while sample.output and not sample.output[-1].strip():
            sample.output.pop()
    return samples


def run(command: str, inference: str, management: str) -> str:
    """What `command` prints (stdout) from the repository root, against the given server."""
    command = command.replace("http://127.0.0.1:8080", inference).replace(
        ".venv/bin/python -m client", f"{sys.executable} -m client --inference-url {inference} "
                                      f"--management-url {management}")
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{command}: exit {done.returncode}\n{done.stderr}")
    return done.stdout.rstrip("\n")


def make_serve_banner() -> str:
    """The banner for `make serve`'s own addresses (the default profile), with the repository as /path/to/repo."""
    from serving.server import banner, local

    return banner(local(), 10.0, already=False).replace(str(ROOT), "/path/to/repo")


def outputs(block: Block, inference: str, management: str) -> list[list[str]]:
    if block.kind == "make serve":
        return [make_serve_banner().splitlines()]
    return [run(sample.command, inference, management).splitlines() for sample in block.samples]


def render(block: Block, made: list[list[str]]) -> list[str]:
    if block.kind == "make serve":
        return made[0]
    lines: list[str] = []
    for sample, output in zip(block.samples, made, strict=True):
        if lines:
            lines.append("")
        lines += [f"$ {line}" if n == 0 else line for n, line in enumerate(sample.command.splitlines())]
        lines += output
    return lines


def masked(text: str) -> str:
    for pattern, replacement in MASKS:
        text = pattern.sub(replacement, text)
    return text


def same_text(shown: str, made: str, tolerance: float) -> str | None:
    """None when `made` is what the README shows (masks applied, numbers within `tolerance` plus one unit of
    their last printed digit), else what differs."""
    shown, made = masked(shown), masked(made)
    if NUMBER.sub("#", shown) != NUMBER.sub("#", made):
        return f"text differs:\n  README: {shown}\n  now:    {made}"
    for a, b in zip(NUMBER.findall(shown), NUMBER.findall(made), strict=True):
        digits = len(a.split("e")[0].partition(".")[2])
        if abs(float(a) - float(b)) > tolerance + 10.0 ** -digits:
            return f"{a} in the README, {b} now (tolerance {tolerance})\n  README: {shown}\n  now:    {made}"
    return None


def served_modes(inference: str, management: str) -> dict[str, str]:
    """model/version → the numerics its workers serve with."""
    from client.api import TorchServeClient

    client = TorchServeClient(inference_url=inference, management_url=management)
    return {f"{model}/{v['modelVersion']}": client.handler_description(model, v["modelVersion"])["numerics"]["mode"]
            for model in ("cifar10", "mnist") for v in client.versions(model)}


def write(inference: str, management: str) -> None:
    from models.numerics import cpu_model, isa

    lines = README.read_text().splitlines()
    for block in reversed(blocks(lines)):
        lines[block.first:block.last] = render(block, outputs(block, inference, management))
    README.write_text("\n".join(lines) + "\n")
    RECORD.write_text(json.dumps({"host": {"cpu": cpu_model(), "isa": isa()},
                                  "modes": served_modes(inference, management)}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", required=True)
    p.parse_args()
    import tempfile

    from tests.integration.conftest import running

    with tempfile.TemporaryDirectory(prefix="readme-samples-") as tmp, \
            running(Path(tmp), ROOT / "config.properties", ROOT / "model_store") as server:
        write(server.url("inference"), server.url("management"))
    print(f"rewrote the samples in {README.name} and {RECORD.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
