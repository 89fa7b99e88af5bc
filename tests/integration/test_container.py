"""What the images in deploy/docker/ run, run here directly (container engines cannot run on these machines):
`python -m serving.server run` in the foreground on `make kserve`'s layout, its health check, and SIGTERM, with
this project's interpreter and with the image's own (pytorch/torchserve:0.12.0-cpu: Python 3.9, torch 2.4.0,
TorchServe 0.12.0 and the psutil, requests and pyyaml it ships, rebuilt by `make kserve-stack-0.12.0`)."""
from __future__ import annotations

import base64
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from serving import kserve
from serving.catalog import ROOT
from serving.config import config_on_free_ports, read_properties
from serving.kserve_pod import stack_python
from tests.conftest import require

CAT = (ROOT / "examples" / "cat.png").read_bytes()


PYTHONS = {"project": sys.executable, "image-0.12.0": str(stack_python("0.12.0"))}


def health(python: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "serving.server", "health", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("python", list(PYTHONS.values()), ids=list(PYTHONS))
def test_the_image_command_starts_reports_ready_and_stops_cleanly_on_sigterm(tmp_path, python):
    require(Path(python).exists(), f"{python} is missing: make kserve-stack-0.12.0 (make test builds it)")
    layout = kserve.build(tmp_path / "layout")
    config = config_on_free_ports(layout / "config" / "config.properties", tmp_path / "config.properties",
                                  layout / "model-store")  # free ports, on 127.0.0.1 (the layout: 0.0.0.0)
    args = ["--config", str(config), "--model-store", str(layout / "model-store"), "--run-dir", str(tmp_path / "run")]
    assert health(python, args).returncode == 1  # nothing runs yet
    main = subprocess.Popen([python, "-m", "serving.server", "run", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240  # a generous bound on a condition
        while (checked := health(python, args)).returncode != 0:
            assert main.poll() is None, main.stdout.read()
            assert time.monotonic() < deadline, checked.stderr
            time.sleep(1)
        assert "every version has a READY worker" in checked.stdout
        inference = read_properties(config)["inference_address"]
        answer = requests.post(f"{inference}/v1/models/cifar10:predict",
                               json={"instances": [{"b64": base64.b64encode(CAT).decode()}]},
                               timeout=60)
        assert answer.status_code == 200 and next(iter(answer.json()["predictions"][0])) == "cat"
        java = int((tmp_path / "run" / "tmp" / ".model_server.pid").read_text())
        workers = [p.pid for p in psutil.Process(java).children(recursive=True)]
        main.send_signal(signal.SIGTERM)
        assert main.wait(timeout=120) == 0
        output = main.stdout.read()
        assert "READY in" in output and "stopped cleanly" in output, output
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in [java, *workers])
        assert health(python, args).returncode == 1
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
