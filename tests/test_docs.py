"""What the README, docs/ and SECURITY.md name exists, and what they tell a reader to run against a server is run
by a test: every `make` target is one `make help` lists, every file under examples/ is there, every link to
another file resolves, and every shell command that talks to a server sits in a sample block that
tests/readme_samples.py (and the tests it names) run as written. (On the old code `make help` omitted bench-deps
and browser-deps, the README sent `examples/dog.png`, which did not exist, and the README's version walkthrough,
its production curl lines and its own-model commands were run by no test.)"""
from __future__ import annotations

import re
import subprocess

from serving.catalog import ROOT
from tests.readme_samples import DOCS, MARK

# A command that talks to a running server (or a cluster): what a reader copies and expects an answer from.
TALKS = re.compile(r"\bcurl\b|\bgrpcurl\b|-m client\b|-m serving\.server token\b|\bkubectl\b|\bwrk\b")
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


def fenced(doc) -> list[tuple[int, str, bool]]:
    """(line number, line, whether its block is a sample block) for every line of a shell block (```bash)."""
    lines, found, shell, inside, marked = doc.read_text().splitlines(), [], False, False, False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            inside, marked = not inside, (not inside) and i > 0 and MARK.match(lines[i - 1]) is not None
            shell = inside and line[3:].strip() in ("bash", "sh", "shell", "console")
            continue
        if shell:
            found.append((i + 1, line, marked))
    return found


def test_every_command_that_talks_to_a_server_is_run_by_a_test():
    unrun = [f"{doc.relative_to(ROOT)}:{n}: {line.strip()}" for doc in DOCS for n, line, marked in fenced(doc)
             if TALKS.search(line) and not marked and not line.lstrip().startswith("#")]
    assert unrun == []


def test_every_link_between_the_docs_resolves():
    broken = [f"{doc.relative_to(ROOT)}: {target}" for doc in DOCS
              for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text())
              if not (doc.parent / target).exists()]
    assert broken == []


def test_the_readme_is_a_front_door():
    """The first screen is what this is and the two commands; the reference lives in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    assert "make archive && make serve" in "\n".join(lines[:40])
