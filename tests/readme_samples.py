"""The docs' commands, run against a real TorchServe: their sample outputs are made this way and kept equal by tests.

A fenced block right after a `<!-- sample -->` line in the README, docs/*.md or SECURITY.md holds `$ command`
lines (a trailing `\\` continues one), each followed by what it prints. The mark names the server it runs on:

    <!-- sample -->              the default profile (config.properties); read-only commands
    <!-- sample: make serve -->  the banner `make serve` prints (`serving.server.banner`)
    <!-- sample: versions -->    a server of their own from config.properties: they change it (promote, retire),
                                 run in the docs' order (the README first)
    <!-- sample: prod -->        the production profile (TLS, tokens: config.prod.properties)
    <!-- sample: own model -->   commands only (no `$`, no output): docs/models.md's own classifier, run by
                                 tests/integration/test_own_model.py on its copy of the repository
    <!-- sample: cluster -->     commands only: what needs a Kubernetes cluster; their requests are run through
                                 KServe's own server by tests/integration/test_kserve_pod.py

Commands run as written from the repository root; only the addresses (`http://127.0.0.1:8080`, the prod
profile's https ports, the client's default addresses), the prod profile's certificate, key file and run folder
are pointed at the server given. `tests/test_docs.py` checks that every shell command in those files that talks to
a server is in such a block.

    python -m tests.readme_samples --write    # servers on free ports from model_store/ (make archive first)

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
from dataclasses import dataclass, field
from pathlib import Path

from serving.catalog import ROOT

README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "SECURITY.md"]
RECORD = Path(__file__).with_name("readme_samples.json")
MARK = re.compile(r"^<!-- sample(?:: (?P<kind>[a-z ]+))? -->$")
KINDS = ("", "make serve", "versions", "prod", "own model", "cluster")
RUN_HERE = ("", "versions", "prod")  # the kinds whose commands this module runs ("make serve" is printed)
COMMANDS_ONLY = ("own model", "cluster")
SAME_MODE_TOLERANCE = 1e-5
OTHER_MODE_TOLERANCE = 1e-2
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
MASKS = [(re.compile(r"\b\d+:READY\b"), "PID:READY"),
         (re.compile(r"numerics \S+ \(.*\)$", re.MULTILINE), "numerics MODE (as the worker chose)"),
         (re.compile(r"up in \d+\.\d s"), "up in N s")]


@dataclass
class Sample:
    """One command of a sample block and the output lines the doc shows for it."""

    command: str
    output: list[str] = field(default_factory=list)


@dataclass
class Block:
    doc: Path
    kind: str
    first: int  # index of the block's first line inside the fence
    last: int  # index of its closing fence
    samples: list[Sample]

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)} line {self.first}"


@dataclass
class Target:
    """A server the commands are pointed at: what replaces the docs' addresses and paths."""

    inference: str
    management: str
    replacements: list[tuple[str, str]]

    @classmethod
    def plain(cls, server) -> Target:
        """A server of the default profile (its inference, management and metrics addresses)."""
        inference, management = server.url("inference"), server.url("management")
        client = (f"{sys.executable} -m client --inference-url {inference} --management-url {management} "
                  f"--metrics-url {server.url('metrics')}")
        return cls(inference, management,
                   [("http://127.0.0.1:8080", inference), (".venv/bin/python -m client", client)])

    @classmethod
    def prod(cls, server) -> Target:
        """The production profile's server: its https ports, its certificate, its keys."""
        token = f"{sys.executable} -m serving.server token --config {server.config} --run-dir {server.run_dir}"
        return cls(server.url("inference"), server.url("management"), [
            ("https://127.0.0.1:8443", server.url("inference")), ("https://127.0.0.1:8444", server.url("management")),
            ("https://127.0.0.1:8445", server.url("metrics")), ("certs/server.crt", str(server.verify)),
            ("logs/key_file.json", str(server.key_file)), (".venv/bin/python -m serving.server token", token),
            (".venv/bin/python -m client", f"{sys.executable} -m client")])

    def run(self, command: str, cwd: Path = ROOT, timeout: float = 600) -> str:
        """What `command` prints (stdout), pointed at this server."""
        for old, new in self.replacements:
            command = command.replace(old, new)
        done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{command}: exit {done.returncode}\n{done.stderr}")
        return done.stdout.rstrip("\n")


def blocks(doc: Path, kinds: tuple[str, ...] = KINDS) -> list[Block]:
    lines = doc.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        mark = MARK.match(line)
        if not mark:
            continue
        kind = mark.group("kind") or ""
        if kind not in KINDS:
            raise ValueError(f"{doc.name} line {i + 1}: unknown sample kind {kind!r} (one of {KINDS})")
        if not lines[i + 1].startswith("```"):
            raise ValueError(f"{doc.name} line {i + 1}: a sample mark must be followed by a fenced block")
        last = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        body = lines[i + 2:last]
        if kind in kinds:
            found.append(Block(doc, kind, i + 2, last, commands(body) if kind in COMMANDS_ONLY else parse(body)))
    return found


def every_block(kinds: tuple[str, ...] = KINDS) -> list[Block]:
    return [block for doc in DOCS for block in blocks(doc, kinds)]


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
        samples.append(Sample("\n".join(command)))
        i += 1
    for sample in samples:
        while sample.output and not sample.output[-1].strip():
            sample.output.pop()
    return samples


def commands(body: list[str]) -> list[Sample]:
    """A commands-only block: every line that is not blank or a comment is a command (`\\` continues one)."""
    samples, pending = [], []
    for line in body:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        if not line.endswith("\\"):
            samples.append(Sample("\n".join(pending)))
            pending = []
    return samples


def make_serve_banner() -> str:
    """The banner for `make serve`'s own addresses (the default profile), with the repository as /path/to/repo."""
    from serving.server import banner, local

    return banner(local(), 10.0, already=False).replace(str(ROOT), "/path/to/repo")


def outputs(block: Block, target: Target | None) -> list[list[str]]:
    if block.kind == "make serve":
        return [make_serve_banner().splitlines()]
    return [target.run(sample.command).splitlines() for sample in block.samples]


def shown(block: Block) -> list[list[str]]:
    """What the doc shows: the banner's lines, or each command's output lines."""
    if block.kind == "make serve":
        return [block.doc.read_text().splitlines()[block.first:block.last]]
    return [sample.output for sample in block.samples]


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
    """None when `made` is what the doc shows (masks applied, numbers within `tolerance` plus one unit of their
    last printed digit), else what differs."""
    shown, made = masked(shown), masked(made)
    if NUMBER.sub("#", shown) != NUMBER.sub("#", made):
        return f"text differs:\n  doc: {shown}\n  now: {made}"
    for a, b in zip(NUMBER.findall(shown), NUMBER.findall(made), strict=True):
        digits = len(a.split("e")[0].partition(".")[2])
        if abs(float(a) - float(b)) > tolerance + 10.0 ** -digits:
            return f"{a} in the doc, {b} now (tolerance {tolerance})\n  doc: {shown}\n  now: {made}"
    return None


def served_modes(inference: str, management: str) -> dict[str, str]:
    """model/version → the numerics its workers serve with."""
    from client.api import TorchServeClient

    client = TorchServeClient(inference_url=inference, management_url=management)
    return {f"{model}/{v['modelVersion']}": client.handler_description(model, v["modelVersion"])["numerics"]["mode"]
            for model in ("cifar10", "mnist") for v in client.versions(model)}


def write(targets: dict[str, Target]) -> None:
    """Rewrite every sample of the kinds in `targets` ("make serve" needs none), in the docs' order."""
    from models.numerics import cpu_model, isa

    for doc in DOCS:
        lines = doc.read_text().splitlines()
        found = blocks(doc, (*targets, "make serve"))
        made = [outputs(block, targets.get(block.kind)) for block in found]
        for block, output in reversed(list(zip(found, made, strict=True))):
            lines[block.first:block.last] = render(block, output)
        doc.write_text("\n".join(lines) + "\n")
    default = targets[""]
    RECORD.write_text(json.dumps({"host": {"cpu": cpu_model(), "isa": isa()},
                                  "modes": served_modes(default.inference, default.management)}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", required=True)
    p.parse_args()
    import tempfile

    from serving.certs import generate
    from tests.integration.conftest import running

    store = ROOT / "model_store"
    with tempfile.TemporaryDirectory(prefix="readme-samples-") as tmp:
        certificate, key = generate(Path(tmp) / "certs")
        tls = {"certificate_file": str(certificate), "private_key_file": str(key)}
        with running(Path(tmp) / "default", ROOT / "config.properties", store) as default, \
                running(Path(tmp) / "versions", ROOT / "config.properties", store) as versions, \
                running(Path(tmp) / "prod", ROOT / "config.prod.properties", store, tls) as prod:
            write({"": Target.plain(default), "versions": Target.plain(versions), "prod": Target.prod(prod)})
    print(f"rewrote the samples in {', '.join(str(d.relative_to(ROOT)) for d in DOCS)} and "
          f"{RECORD.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
