"""deploy/: every InferenceService validates against KServe's own v1beta1 schema, names a layout `make kserve`
writes, and the images call the commands the suite runs (tests/integration/test_container.py)."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT, require

CRD = ROOT.parent / "shared" / "kserve" / "serving.kserve.io_inferenceservices.yaml"
MANIFESTS = sorted((ROOT / "deploy" / "kserve").glob("*.yaml"))
SERVICES = [path for path in MANIFESTS if yaml.safe_load(path.read_text())["kind"] == "InferenceService"]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    """What a cluster checks an InferenceService against: the CRD's v1beta1 openAPIV3Schema."""
    require(CRD.is_file(), f"{CRD} is absent: KServe's CRD is only on CI and the project's machines")
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 39,000 lines
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


def test_there_are_manifests_for_both_models_both_protocols_a_canary_and_a_gpu():
    specs = {path.stem: yaml.safe_load(path.read_text())["spec"]["predictor"] for path in SERVICES}
    assert {"cifar10-v1", "cifar10-v2", "mnist-v1", "mnist-v2", "cifar10-canary", "cifar10-gpu"} <= set(specs)
    assert specs["cifar10-canary"]["canaryTrafficPercent"] == 20
    assert specs["cifar10-gpu"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {s["model"]["protocolVersion"] for s in specs.values()} == {"v1", "v2"}


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_inference_service_validates_against_kserves_schema(validator, path):
    manifest = yaml.safe_load(path.read_text())
    validator.validate(manifest)
    wrong = dict(manifest, spec={**manifest["spec"], "predictor": {**manifest["spec"]["predictor"],
                                                                  "scaleMetric": "bogus"}})
    with pytest.raises(jsonschema.ValidationError):  # the schema does constrain what it validates
        validator.validate(wrong)


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_storage_uri_names_a_layout_make_kserve_writes(path):
    uri = yaml.safe_load(path.read_text())["spec"]["predictor"]["model"]["storageUri"]
    plan = subprocess.run(["make", "-n", "kserve"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"--out build/{uri.rstrip('/').rsplit('/', 1)[-1]} " in plan, (uri, plan)


def instruction_args(dockerfile: Path, instruction: str) -> list[str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith(instruction + " "))
    return yaml.safe_load(re.sub(rf"^{instruction}\s+(CMD\s+)?", "", line))


def test_the_image_runs_and_checks_what_the_suite_runs():
    dockerfile = ROOT / "deploy" / "docker" / "Dockerfile"
    entrypoint = instruction_args(dockerfile, "ENTRYPOINT")
    health = instruction_args(dockerfile, "HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3")
    assert entrypoint[:4] == ["python", "-m", "serving.server", "run"]
    assert health[:4] == ["python", "-m", "serving.server", "health"] and health[4:] == entrypoint[4:]
    assert "USER model-server" in dockerfile.read_text() and "STOPSIGNAL SIGTERM" in dockerfile.read_text()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.MULTILINE):
        for part in shlex.split(source):
            assert (ROOT / part).exists() or part.startswith("build/"), part
