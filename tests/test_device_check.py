"""The device check (`python -m benchmarks.device_check`), run here with the CPU on both sides: the code a GPU
session runs is the code these tests run, so a broken check is found before device time is spent on it."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import device_check
from models.reference import path_for
from serving import archive
from serving.catalog import SHIPPED


def test_the_device_check_compares_answers_explanations_and_speed(tmp_path, capsys):
    """Only the archives in the store are checked (here mnist's); with the CPU on both sides the fp32 answers and
    explanations are the same computation, so they must agree exactly, and the labels are scored against the
    reference images' true labels (mnist's network gets >= 90% of 32 right; it scores 99.2% on validation)."""
    mnist = next(v for v in SHIPPED if v.model == "mnist")
    archive.build(mnist, tmp_path / "store")
    out = tmp_path / "check.json"
    device_check.main(["--device", "cpu", "--store", str(tmp_path / "store"), "--count", "32", "--seconds", "0.05",
                       "--validation", f"mnist={path_for('mnist')}", "--out", str(out)])
    report = json.loads(out.read_text())
    [result] = report["results"]
    assert result["version"] == "mnist 1.0" and result["images"] == 32
    assert result["fp32"] == {"top1_equal": 32, "explained_same_label": device_check.EXPLAINED,
                              "explanation_max_relative_l2": 0.0}
    for side in ("cpu_auto", "cpu_fp32", "device_auto", "device_fp32"):
        assert result[side]["device"] == "cpu"
        assert result[side]["accuracy"] >= 0.9
        assert set(result[side]["rate"]) == {str(b) for b in device_check.BATCHES}
        assert all(rate > 0 for rate in result[side]["rate"].values())
    assert {result["cpu_fp32"]["numerics"][str(b)]["mode"] for b in device_check.BATCHES} == {"fp32"}
    assert report["host"]["torch"] == torch.__version__
    printed = capsys.readouterr()
    assert "| mnist 1.0 |" in printed.out and "32/32" in printed.out
    assert "skipping cifar10 1.0" in printed.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_device_check_refuses_cuda_where_there_is_none(capsys):
    with pytest.raises(SystemExit):
        device_check.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err
