"""What the README and SECURITY.md name exists: every `make` target is one `make help` lists, every file under
examples/ is there. (On the old code `make help` omitted bench-deps and browser-deps, and the README sent
`examples/dog.png`, which did not exist.)"""
from __future__ import annotations

import re
import subprocess

from serving.catalog import ROOT

DOCS = [ROOT / "README.md", ROOT / "SECURITY.md"]
PROSE = {"the", "it", "sure", "a"}  # "make the page", not a target


def test_every_make_target_the_docs_name_is_in_make_help():
    listed = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    targets = {line.split()[1] for line in listed.splitlines() if line.strip().startswith("make ")}
    named = {m for doc in DOCS for m in re.findall(r"\bmake ([a-z][a-z0-9.-]*[a-z0-9])", doc.read_text())} - PROSE
    assert named and named <= targets, sorted(named - targets)


def test_every_example_the_docs_name_exists():
    named = {m for doc in DOCS for m in re.findall(r"examples/[\w.-]+\.\w+", doc.read_text())}
    assert named and all((ROOT / name).is_file() for name in named), sorted(n for n in named
                                                                            if not (ROOT / n).is_file())
