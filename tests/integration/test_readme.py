"""Every sample output in the README is what its command prints now, against a real TorchServe
(tests/readme_samples.py: `python -m tests.readme_samples --write` makes them). On the old code the README's own
samples disagreed with each other (cat 0.935254, 0.936484 and 0.9365 for one image), and `versions` lacked the
numerics its workers report."""
from __future__ import annotations

import json

from tests import readme_samples as samples


def test_the_readme_marks_its_samples():
    blocks = samples.blocks(samples.README.read_text().splitlines())
    commands = [sample.command for block in blocks for sample in block.samples]
    assert [b.kind for b in blocks].count("make serve") == 1
    for needle in ("-T examples/cat.png", "-F a=@examples/cat.png -F b=@examples/dog.png", "client predict",
                   "client versions", "/explanations/cifar10/2.0", '"instances"', '"inputs"', '"shape": [1, 28, 28]'):
        assert any(needle in command for command in commands), needle


def test_every_readme_sample_is_what_its_command_prints_now(served):
    inference, management = served.url("inference"), served.url("management")
    record = json.loads(samples.RECORD.read_text())
    modes = samples.served_modes(inference, management)
    tolerance = samples.SAME_MODE_TOLERANCE if modes == record["modes"] else samples.OTHER_MODE_TOLERANCE
    lines = samples.README.read_text().splitlines()
    for block in samples.blocks(lines):
        shown = ([lines[block.first:block.last]] if block.kind == "make serve"
                 else [sample.output for sample in block.samples])
        for output, made in zip(shown, samples.outputs(block, inference, management), strict=True):
            assert len(output) == len(made), (block.samples, output, made)
            for a, b in zip(output, made, strict=True):
                difference = samples.same_text(a, b, tolerance)
                assert difference is None, f"README line {block.first}: {difference} (modes now {modes})"
