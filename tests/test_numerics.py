"""Numerics chosen per host (models/numerics.py): the rule itself, every mode's accuracy on the real validation
split, and what a worker built from a real archive says it chose."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import numerics, onnx_runtime, zoo
from models.reference import path_for
from models.specs import SPECS
from serving.catalog import SHIPPED
from tests import reference, standin
from tests.conftest import shared_npz, version_key
from tests.standin import StandIn


def LayoutSensitive(cl_agrees: bool) -> StandIn:  # noqa: N802 (reads as the network it builds)
    """Slow (3 ms of busy CPU per call: a one-thread worker's measure is CPU time) on contiguous NCHW input and
    under bf16, free on channels_last, where it answers the same logits or different ones (`cl_agrees`)."""
    return StandIn(3 * 4 * 4, {"fp32": 0.003, "fp32-cl": 0.0, "bf16": 0.0035}, wait=0.0, cl_agrees=cl_agrees)


AUTO = {"numerics": "auto"}  # what the tests of the measurement itself run, whatever the YAML forces


def reference_images(count: int = 200) -> torch.Tensor:
    return torch.randn(count, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def test_auto_serves_the_faster_mode_when_it_agrees_with_fp32():
    runner, choice = numerics.choose(LayoutSensitive(cl_agrees=True), torch.device("cpu"), "auto",
                                     reference_images(), batch_size=8, seconds=0.1)
    assert choice.mode == "fp32-cl" and runner.mode == "fp32-cl" and choice.chosen_by == "auto"
    assert choice.images_per_s["fp32-cl"] > numerics.MIN_GAIN * choice.images_per_s["fp32"]
    assert choice.agreement["fp32-cl"] == 1.0


def test_waiting_for_a_core_does_not_decide_the_choice():
    """On the wall clock the wait shrinks fp32-cl's lead to 28/27 = 1.04x, under MIN_GAIN, and fp32 was served
    (seen on real start-ups of `make bench`: cifar10 2.0 in fp32, 1.7x slower, and 1.0 in fp32). The measure is
    thread's CPU time, which keeps the stand-in's 1.5x (a worker runs one torch thread, as here), so fp32-cl is
    chosen; no rate is asserted (a 1.25x stand-in measured 1.15x once in CI, under its old 1.15x bound)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        contended = StandIn(3 * 4 * 4)  # tests/standin.py's CONTENDED costs and 25 ms wait
        runner, choice = numerics.choose(contended, torch.device("cpu"), "auto", reference_images(),
                                         batch_size=8, seconds=0.3)
    finally:
        torch.set_num_threads(threads)
    assert choice.mode == "fp32-cl", choice


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
    from models.reference import REFERENCE_SIZE
    from training.reference import reference_set

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
    model = reference.network(version)
    cpu = torch.device("cpu")

    def top1(mode: str, images: torch.Tensor) -> torch.Tensor:
        return numerics.top1(numerics.Runner(model, mode, cpu), spec.normalize(images), batch_size=250)

    fp32 = top1("fp32", val_images)
    fp32_accuracy = (fp32 == val_labels).float().mean().item()
    for mode in numerics.candidates(cpu)[1:]:
        accuracy = (top1(mode, val_images) == val_labels).float().mean().item()
        assert abs(accuracy - fp32_accuracy) <= 0.002, (mode, accuracy, fp32_accuracy)
    if "bf16" not in numerics.candidates(cpu):
        shipped, _, _ = numerics.load_reference(path_for(version.model))
        agreement = (top1("bf16", shipped) == top1("fp32", shipped)).float().mean().item()
        assert agreement >= numerics.MIN_AGREEMENT, agreement


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_a_worker_reports_the_mode_it_chose_and_serves_with_it(harness, version):
    """What a real worker reports obeys the rule in full, whichever mode it lands on: a mode forced by the YAML
    is served as configured; "auto" serves the fastest candidate that beat fp32 by more than MIN_GAIN and agreed,
    and fp32 only where no candidate did both."""
    h = harness(version_key(version.model, version.version))
    described = h.handler.describe()["numerics"]
    assert h.handler.model.mode == described["mode"]
    configured = str(reference.handler_config(version).get("numerics", "auto"))
    if configured != "auto":
        assert (described["mode"], described["chosen_by"]) == (configured, "config")
        return
    cpu = torch.device("cpu")
    assert described["chosen_by"].startswith("auto") and described["isa"] == numerics.isa()
    ort = set(onnx_runtime.shipped(h.model_dir)) - set(described["refused"])  # those the accuracy rule admitted
    assert set(described["images_per_s"]) == set(numerics.candidates(cpu)) | ort
    assert described["batch_size"] == h.context.system_properties["batch_size"]
    rates, agreement = described["images_per_s"], described["agreement"]
    winners = [mode for mode in rates if mode != "fp32" and rates[mode] >= numerics.MIN_GAIN * rates["fp32"]]
    # Candidates are checked fastest first and the first that agrees is served, so every faster winner disagreed.
    for mode in winners:
        if rates[mode] > rates[described["mode"]] or described["mode"] == "fp32":
            assert agreement[mode] < numerics.MIN_AGREEMENT, (mode, described)
    if described["mode"] != "fp32":
        assert described["mode"] in winners and agreement[described["mode"]] >= numerics.MIN_AGREEMENT


def test_a_worker_chooses_by_its_own_cpu_time_at_the_batch_size_torchserve_gives_it(model_dirs, tmp_path):
    """Through the real handler's initialize: a copy of the cifar10 archive whose network is a stand-in that is
    1.5x faster in fp32-cl in CPU time but waits 25 ms per call for a core (as on a 2-core host where a version's
    other workers start beside it), registered with batch_size=16 where the YAML says 8. The worker must serve
    fp32-cl (on the wall clock the lead shrinks under MIN_GAIN and fp32 would be served) and report that it timed
    at batch 16."""
    import shutil

    from serving.inprocess import InProcessHandler

    model_dir = shutil.copytree(model_dirs["cifar10"], tmp_path / "cifar10",
                                ignore=shutil.ignore_patterns(".numerics*"))
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    shutil.copy(Path(standin.__file__), model_dir / manifest["model"]["modelFile"])
    torch.save(StandIn().state_dict(), model_dir / manifest["model"]["serializedFile"])
    with np.load(model_dir / "reference.npz") as shipped:  # the stand-in's fp32 answers are computed at start-up
        np.savez(model_dir / "reference.npz", images=shipped["images"][:64], labels=shipped["labels"][:64])
    h = InProcessHandler(model_dir, {"handler": {"threads": 1, **AUTO}}, batch_size=16)
    chosen = h.handler.describe()["numerics"]
    assert (chosen["mode"], chosen["batch_size"]) == ("fp32-cl", 16), chosen


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_the_archives_fp32_answers_are_this_hosts(model_dirs, version):
    """An archive ships the fp32 top-1 committed beside the weights (computed once, on the host the record names),
    not one computed wherever it is built, and fp32 on this host gives the same answers: a top-1 may differ only
    where the best two logits are within 1e-5, a tie kernels on different hosts do not decide alike."""
    from serving import archive

    record = json.loads(archive.fp32_record_path(version.weights).read_text())
    committed = archive.recorded_fp32_top1(version.model, version.weights)
    assert committed is not None, f"{archive.fp32_record_path(version.weights)} is stale: run make reference"
    assert record["host"]["cpu"] and record["host"]["torch"]
    images, _, shipped = numerics.load_reference(model_dirs[version_key(version.model, version.version)]
                                                 / "reference.npz")
    assert np.array_equal(shipped.numpy(), committed)
    with torch.inference_mode():
        logits = reference.network(version)(SPECS[version.model].normalize(images))
    top2 = logits.topk(2, dim=1).values
    differ = torch.from_numpy(committed) != logits.argmax(1)
    assert (top2[differ, 0] - top2[differ, 1] < 1e-5).all(), differ.nonzero().flatten().tolist()


def test_the_workers_of_a_version_share_one_measurement(model_dirs, tmp_path):
    """The second worker of a version (same model directory) serves the first one's mode without measuring; a
    record made on another host is measured again."""
    import shutil

    from serving.inprocess import InProcessHandler

    model_dir = shutil.copytree(model_dirs["cifar10"], tmp_path / "cifar10",
                                ignore=shutil.ignore_patterns(".numerics*"))
    first = InProcessHandler(model_dir, {"handler": AUTO}).handler.numerics
    assert first.chosen_by == "auto" and (model_dir / ".numerics.json").exists()
    second = InProcessHandler(model_dir, {"handler": AUTO}).handler.numerics
    assert second.chosen_by == "auto" and second.shared and not first.shared
    assert (second.mode, second.images_per_s) == (first.mode, first.images_per_s)
    record = json.loads((model_dir / ".numerics.json").read_text())
    record["key"]["cpu"] = "another CPU"
    (model_dir / ".numerics.json").write_text(json.dumps(record))
    assert InProcessHandler(model_dir, {"handler": AUTO}).handler.numerics.chosen_by == "auto"


def test_a_yaml_numerics_setting_wins_and_a_bad_one_fails_the_worker(harness):
    assert harness("mnist", handler={"numerics": "fp32"}).handler.describe()["numerics"]["chosen_by"] == "config"
    with pytest.raises(ValueError, match="handler.numerics must be one of"):
        harness("mnist", handler={"numerics": "int4"})


def test_an_archive_without_reference_images_serves_fp32_and_says_so(model_dirs, tmp_path, caplog):
    import shutil

    from serving.inprocess import InProcessHandler

    old = shutil.copytree(model_dirs["mnist"], tmp_path / "old")
    (old / "reference.npz").unlink()
    h = InProcessHandler(old, {"handler": AUTO})
    assert h.handler.describe()["numerics"] == {**h.handler.describe()["numerics"], "mode": "fp32",
                                                "chosen_by": "no reference images"}
    assert any("no reference.npz" in record.getMessage() for record in caplog.records)
