"""Every sample output in the README, docs/ and SECURITY.md is what its command prints now, against a real
TorchServe of the profile it names (tests/readme_samples.py; `python -m tests.readme_samples --write` makes them).
On the old code the README's own samples disagreed with each other (cat 0.935254, 0.936484 and 0.9365 for one
image), `versions` lacked the numerics its workers report, and the version walkthrough, the production profile's
curl lines and the own-model commands were never run."""
from __future__ import annotations

import json

import pytest

from serving.catalog import ROOT
from tests import readme_samples as samples
from tests.integration.conftest import running


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory, model_store):
    """A server of the versions samples' own: they promote, roll back and retire versions."""
    with running(tmp_path_factory.mktemp("ts-versions"), ROOT / "config.properties", model_store) as server:
        yield server


def test_the_docs_mark_their_samples():
    blocks = samples.every_block()
    commands = [sample.command for block in blocks for sample in block.samples]
    assert [b.kind for b in blocks].count("make serve") == 1
    for kind in samples.KINDS:
        assert any(b.kind == kind for b in blocks), kind
    for needle in ("-T examples/cat.png", "-F a=@examples/cat.png -F b=@examples/dog.png", "client predict",
                   "client versions", "client promote", "client unregister", "/explanations/cifar10/2.0",
                   '"instances"', '"inputs"', '"shape": [1, 28, 28]', "serving.server token management"):
        assert any(needle in command for command in commands), needle


def test_every_sample_is_what_its_command_prints_now(served, served_prod, walkthrough):
    inference, management = served.url("inference"), served.url("management")
    record = json.loads(samples.RECORD.read_text())
    modes = samples.served_modes(inference, management)
    tolerance = samples.SAME_MODE_TOLERANCE if modes == record["modes"] else samples.OTHER_MODE_TOLERANCE
    targets = {"": samples.Target.plain(served), "prod": samples.Target.prod(served_prod),
               "versions": samples.Target.plain(walkthrough)}
    for block in samples.every_block(("make serve", *samples.RUN_HERE)):  # the docs' order: versions samples in turn
        for output, made in zip(samples.shown(block), samples.outputs(block, targets.get(block.kind)), strict=True):
            assert len(output) == len(made), (block.where, block.samples, output, made)
            for a, b in zip(output, made, strict=True):
                difference = samples.same_text(a, b, tolerance)
                assert difference is None, f"{block.where}: {difference} (modes now {modes})"
