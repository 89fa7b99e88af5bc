"""Numerics chosen per host (models/numerics.py): the rule itself, every mode's accuracy on the real validation
split, and what a worker built from a real archive says it chose."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from models import numerics, zoo
from models.specs import SPECS
from serving.catalog import SHIPPED
from tests.conftest import shared_npz, version_key
from training.reference import path_for


class LayoutSensitive(nn.Module):
    """A stand-in network whose speed and answer depend on the memory format it is given: slow (3 ms of busy CPU
    per call: a one-thread worker's measure is CPU time) on contiguous NCHW input, fast on channels_last, where it
    answers either the same logits or different ones (`cl_agrees`). It lets the test pin which mode must win
    without depending on a CPU's kernels."""

    def __init__(self, cl_agrees: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, 10)
        self.cl_agrees = cl_agrees

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
            busy(0.003)
            return logits
        return logits if self.cl_agrees else logits.roll(1, dims=1)


def reference_images(count: int = 200) -> torch.Tensor:
    return torch.randn(count, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def test_auto_serves_the_faster_mode_when_it_agrees_with_fp32():
    runner, choice = numerics.choose(LayoutSensitive(cl_agrees=True), torch.device("cpu"), "auto",
                                     reference_images(), batch_size=8, seconds=0.1)
    assert choice.mode == "fp32-cl" and runner.mode == "fp32-cl" and choice.chosen_by == "auto"
    assert choice.images_per_s["fp32-cl"] > numerics.MIN_GAIN * choice.images_per_s["fp32"]
    assert choice.agreement["fp32-cl"] == 1.0


def busy(seconds: float) -> None:
    """Compute for `seconds` of this thread's CPU time."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


class Contended(nn.Module):
    """fp32-cl costs 2.4 ms of CPU per call, fp32 3 ms (1.25x), and every call also waits 10 ms for a core that
    other processes hold (a sleep: time passes, nothing is computed here), as when a version's first worker
    measures while the other workers start on a 2-core host."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.010)
        busy(0.0024 if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else 0.003)
        return self.linear(x.flatten(1))


def test_waiting_for_a_core_does_not_decide_the_choice():
    """On the wall clock the wait shrinks fp32-cl's lead to 13/12.4 = 1.05x, under MIN_GAIN, and fp32 was served
    (seen on real start-ups of `make bench`: cifar10 2.0 in fp32, 1.7x slower, and 1.0 in fp32). The measure is
    thread's CPU time, which keeps the 1.25x (a worker runs one torch thread, as here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner, choice = numerics.choose(Contended(), torch.device("cpu"), "auto", reference_images(),
                                         batch_size=8, seconds=0.3)
    finally:
        torch.set_num_threads(threads)
    assert choice.mode == "fp32-cl", choice
    assert choice.images_per_s["fp32-cl"] > 1.15 * choice.images_per_s["fp32"]


def test_auto_refuses_a_faster_mode_that_disagrees_with_fp32():
    runner, choice = numerics.choose(LayoutSensitive(cl_agrees=False), torch.device("cpu"), "auto",
                                     reference_images(), batch_size=8, seconds=0.1)
    assert choice.mode == "fp32" and runner.mode == "fp32"
    assert choice.agreement["fp32-cl"] < numerics.MIN_AGREEMENT
    assert "fp32-cl" in choice.summary() and "fp32 " in choice.summary()


def test_a_configured_mode_is_served_without_timing():
    runner, choice = numerics.choose(LayoutSensitive(cl_agrees=False), torch.device("cpu"), "fp32-cl",
                                     reference_images(), batch_size=8)
    assert (runner.mode, choice.chosen_by, choice.images_per_s) == ("fp32-cl", "config", {})
    with pytest.raises(ValueError, match="handler.numerics must be one of"):
        numerics.choose(LayoutSensitive(cl_agrees=True), torch.device("cpu"), "fp16", reference_images(), 8)


def test_bf16_is_a_candidate_only_where_the_cpu_computes_it():
    cpu = torch.device("cpu")
    assert numerics.candidates(cpu, {"avx2", "fma"}) == ("fp32", "fp32-cl")
    assert numerics.candidates(cpu, {"avx512f", "avx512_bf16"}) == numerics.MODES
    assert numerics.candidates(cpu, {"amx_bf16", "amx_tile"}) == numerics.MODES
    assert set(numerics.isa({"avx2", "amx_tile", "sse"})) == {"avx2", "amx_tile"}


def test_every_mode_returns_float32_logits_of_the_fp32_network():
    model = zoo.get("lenet").build().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        for mode in numerics.MODES:
            out = numerics.Runner(model, mode, torch.device("cpu"))(x)
            assert out.dtype == torch.float32 and out.shape == (4, 10)
            # bf16 keeps 8 bits of mantissa: logits of this size agree to ~1e-2; fp32 layouts to float noise.
            torch.testing.assert_close(out, expected, atol=5e-2 if mode == "bf16" else 1e-5, rtol=0)


@pytest.mark.parametrize("dataset", sorted(SPECS))
def test_the_reference_images_are_the_first_of_the_validation_split(dataset):
    from training.reference import REFERENCE_SIZE, reference_set

    images, labels, _ = numerics.load_reference(path_for(dataset))
    expected_images, expected_labels = reference_set(dataset, "npz", shared_npz(dataset))
    assert len(images) == REFERENCE_SIZE
    assert np.array_equal(images.numpy(), expected_images) and np.array_equal(labels.numpy(), expected_labels)


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_every_mode_this_host_may_choose_keeps_validation_accuracy(version, validation_split):
    """The issue's bar: on the 5,000 validation images every candidate of this host (bf16 on AMX / AVX512-BF16
    hosts) is within 0.2 points of fp32; bf16, which a YAML may force anywhere, agrees with fp32 on ≥ 99.5% of
    the reference images on every host (only 400 images: emulated bf16 runs ~60 img/s on an AVX2 CPU)."""
    spec = SPECS[version.model]
    val_images, val_labels = validation_split(version.model)
    model = zoo.get(version.arch).build()
    model.load_state_dict(torch.load(version.weights, weights_only=True))
    model.eval()
    cpu = torch.device("cpu")

    def top1(mode: str, images: torch.Tensor) -> torch.Tensor:
        return numerics.top1(numerics.Runner(model, mode, cpu), spec.normalize(images), batch_size=250)

    fp32 = top1("fp32", val_images)
    fp32_accuracy = (fp32 == val_labels).float().mean().item()
    for mode in numerics.candidates(cpu)[1:]:
        accuracy = (top1(mode, val_images) == val_labels).float().mean().item()
        assert abs(accuracy - fp32_accuracy) <= 0.002, (mode, accuracy, fp32_accuracy)
    if "bf16" not in numerics.candidates(cpu):
        reference, _, _ = numerics.load_reference(path_for(version.model))
        agreement = (top1("bf16", reference) == top1("fp32", reference)).float().mean().item()
        assert agreement >= numerics.MIN_AGREEMENT, agreement


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_a_worker_reports_the_mode_it_chose_and_serves_with_it(harness, version):
    h = harness(version_key(version.model, version.version))
    described = h.handler.describe()["numerics"]
    assert described["mode"] in numerics.candidates(torch.device("cpu"))
    assert described["chosen_by"].startswith("auto") and described["isa"] == numerics.isa()
    assert set(described["images_per_s"]) == set(numerics.candidates(torch.device("cpu")))
    assert h.handler.model.mode == described["mode"]
    best = max(described["images_per_s"].values())
    chosen = described["images_per_s"][described["mode"]]
    # The rule: the chosen mode is the fastest, or fp32 when nothing beat it by more than MIN_GAIN, or the
    # faster ones disagreed.
    assert (chosen == best or described["mode"] == "fp32"
            or any(share < numerics.MIN_AGREEMENT for share in described["agreement"].values()))


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_the_archives_fp32_answers_are_this_hosts(model_dirs, version):
    """The fp32 top-1 an archive ships for its reference images (computed when it was built, so workers skip an
    fp32 pass) is what fp32 gives on this host too; a top-1 may differ only where the best two logits are within
    1e-5, a tie kernels on different hosts do not decide alike."""
    images, _, shipped = numerics.load_reference(model_dirs[version_key(version.model, version.version)]
                                                 / "reference.npz")
    model = zoo.get(version.arch).build()
    model.load_state_dict(torch.load(version.weights, weights_only=True))
    with torch.inference_mode():
        logits = model.eval()(SPECS[version.model].normalize(images))
    top2 = logits.topk(2, dim=1).values
    differ = shipped != logits.argmax(1)
    assert (top2[differ, 0] - top2[differ, 1] < 1e-5).all(), differ.nonzero().flatten().tolist()


def test_the_workers_of_a_version_share_one_measurement(model_dirs, tmp_path):
    """The second worker of a version (same model directory) serves the first one's mode without measuring; a
    record made on another host is measured again."""
    import json
    import shutil

    from serving.inprocess import InProcessHandler

    model_dir = shutil.copytree(model_dirs["cifar10"], tmp_path / "cifar10",
                                ignore=shutil.ignore_patterns(".numerics*"))
    first = InProcessHandler(model_dir).handler.numerics
    assert first.chosen_by == "auto" and (model_dir / ".numerics.json").exists()
    second = InProcessHandler(model_dir).handler.numerics
    assert second.chosen_by == "auto, measured by the version's first worker"
    assert (second.mode, second.images_per_s) == (first.mode, first.images_per_s)
    record = json.loads((model_dir / ".numerics.json").read_text())
    record["key"]["cpu"] = "another CPU"
    (model_dir / ".numerics.json").write_text(json.dumps(record))
    assert InProcessHandler(model_dir).handler.numerics.chosen_by == "auto"


def test_a_yaml_numerics_setting_wins_and_a_bad_one_fails_the_worker(harness):
    assert harness("mnist", handler={"numerics": "fp32"}).handler.describe()["numerics"]["chosen_by"] == "config"
    with pytest.raises(ValueError, match="handler.numerics must be one of"):
        harness("mnist", handler={"numerics": "int4"})


def test_an_archive_without_reference_images_serves_fp32_and_says_so(model_dirs, tmp_path, caplog):
    import shutil

    from serving.inprocess import InProcessHandler

    old = shutil.copytree(model_dirs["mnist"], tmp_path / "old")
    (old / "reference.npz").unlink()
    h = InProcessHandler(old)
    assert h.handler.describe()["numerics"] == {**h.handler.describe()["numerics"], "mode": "fp32",
                                                "chosen_by": "no reference images"}
    assert any("no reference.npz" in record.getMessage() for record in caplog.records)
