"""deploy/: every manifest validates strictly against KServe's own CRD (as an API server with strict field
validation checks it: unknown fields rejected wherever the schema does not preserve them, plus the ranges KServe's
webhook enforces), every InferenceService names this project's runtime and a layout `make kserve` writes, the
runtime runs what the suite runs (serving/kserve_pod.py), and the images call the commands the suite runs."""
from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT, require

KSERVE = ROOT.parent / "shared" / "kserve"
CRD = KSERVE / "serving.kserve.io_inferenceservices.yaml"
RUNTIME_CRD = KSERVE / "serving.kserve.io_clusterservingruntimes.yaml"
STOCK_RUNTIME = KSERVE / "kserve-torchserve-runtime.yaml"
MANIFESTS = sorted((ROOT / "deploy" / "kserve").glob("*.yaml"))
SERVICES = [path for path in MANIFESTS if yaml.safe_load(path.read_text())["kind"] == "InferenceService"]
RUNTIME = ROOT / "deploy" / "kserve" / "custom-runtime.yaml"


def strict(schema: dict) -> dict:
    """A CRD's structural schema as strict field validation applies it: an object that lists its `properties`
    and neither preserves unknown fields nor says `additionalProperties` accepts no other field."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


def crd_validator(path: Path, version: str) -> jsonschema.Draft7Validator:
    require(path.is_file(), f"{path} is absent: KServe's CRDs are only on CI and the project's machines")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # up to 39,000 lines
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(strict(schema))


def webhook_errors(manifest: dict) -> list[str]:
    """What KServe's validating webhook rejects and the CRD leaves open (canaryTrafficPercent is a bare int64)."""
    percent = manifest["spec"]["predictor"].get("canaryTrafficPercent")
    return [] if percent is None or 0 <= percent <= 100 else [f"canaryTrafficPercent {percent} is not in 0-100"]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    """What a cluster checks an InferenceService against: the CRD's v1beta1 openAPIV3Schema, strictly."""
    return crd_validator(CRD, "v1beta1")


@pytest.fixture(scope="module")
def runtime_validator() -> jsonschema.Draft7Validator:
    return crd_validator(RUNTIME_CRD, "v1alpha1")


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
    assert webhook_errors(manifest) == []
    predictor = manifest["spec"]["predictor"]
    wrong_value = dict(manifest, spec={**manifest["spec"], "predictor": {**predictor, "scaleMetric": "bogus"}})
    with pytest.raises(jsonschema.ValidationError):  # the schema does constrain what it validates
        validator.validate(wrong_value)
    misspelt = dict(manifest, spec={**manifest["spec"], "predictor": {
        **predictor, "model": {**predictor["model"], "storageUrl": predictor["model"]["storageUri"]}}})
    with pytest.raises(jsonschema.ValidationError, match="storageUrl"):  # strict: an unknown field is an error
        validator.validate(misspelt)
    for percent, errors in ((0, 0), (100, 0), (101, 1), (-1, 1)):
        canary = dict(manifest, spec={**manifest["spec"], "predictor": {**predictor, "canaryTrafficPercent": percent}})
        validator.validate(canary)
        assert len(webhook_errors(canary)) == errors, percent


def test_the_runtime_validates_strictly_against_its_crd(runtime_validator):
    runtime = yaml.safe_load(RUNTIME.read_text())
    runtime_validator.validate(runtime)
    container = runtime["spec"]["containers"][0]
    misspelt = dict(runtime, spec={**runtime["spec"], "containers": [{**container, "argz": container["args"]}]})
    with pytest.raises(jsonschema.ValidationError, match="argz"):
        runtime_validator.validate(misspelt)


def test_every_service_names_the_runtime_whose_stack_the_suite_runs():
    """Each InferenceService names classifiers-torchserve (not the stock kserve-torchserve, whose 0.9.0 image
    says ready before TorchServe has a worker), whose protocols cover the service's, whose container runs the
    stock runtime's own args and env (plus a shorter MODEL_LOAD_DELAY), and whose image is
    deploy/docker/Dockerfile.kserve on the base whose stack `make kserve-stack-0.12.0` rebuilds."""
    runtime = yaml.safe_load(RUNTIME.read_text())
    for path in SERVICES:
        model = yaml.safe_load(path.read_text())["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"], path.name
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"], path.name
    require(STOCK_RUNTIME.is_file(), f"{STOCK_RUNTIME} is only on CI and the project's machines")
    stock = yaml.safe_load(STOCK_RUNTIME.read_text())["spec"]["containers"][0]
    ours = runtime["spec"]["containers"][0]
    assert ours["args"] == stock["args"] and all(variable in ours["env"] for variable in stock["env"])
    assert {e["name"] for e in ours["env"]} - {e["name"] for e in stock["env"]} == {"MODEL_LOAD_DELAY"}
    assert ours["image"].endswith(":0.12.0")
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile.kserve").read_text()
    assert re.search(r"^ARG BASE=pytorch/torchserve-kfs:0\.12\.0$", dockerfile, re.MULTILINE)
    # What it starts is the entrypoint serving/kserve_pod.py runs as the "project" front, from these files.
    assert instruction_args(ROOT / "deploy" / "docker" / "Dockerfile.kserve", "ENTRYPOINT") == [
        "/usr/local/bin/kserve-entrypoint.sh"]
    assert "COPY deploy/docker/kserve-entrypoint.sh /usr/local/bin/kserve-entrypoint.sh" in dockerfile
    assert "COPY serving/kserve_front.py /home/model-server/kserve_front.py" in dockerfile
    assert "/home/model-server/kserve_front.py" in (ROOT / "deploy" / "docker" / "kserve-entrypoint.sh").read_text()
    stack = (ROOT / "deploy" / "kserve" / "stacks" / "torchserve-kfs-0.12.0.txt").read_text()
    assert "torchserve==0.12.0" in stack and "torch==2.4.0" in stack and "kserve[storage]==0.13.0" in stack


@functools.cache
def kserve_plan() -> str:
    """The commands `make kserve` runs (one per layout it writes)."""
    return subprocess.run(["make", "-n", "kserve"], cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_storage_uri_names_a_layout_make_kserve_writes(path):
    uri = yaml.safe_load(path.read_text())["spec"]["predictor"]["model"]["storageUri"]
    plan = kserve_plan()
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
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text().replace("\\\n", " "), re.MULTILINE):
        for part in shlex.split(source):
            assert (ROOT / part).exists() or part.startswith("build/"), part


# Measured peaks (docs/serving.md, "Memory"; 2-core AMD EPYC with AVX512-BF16, 2026-12-01): a worker's high-water mark
# under the worst batch the pixel budgets admit (695-719 MiB); java's bound, its heap and direct memory (as
# much again unless capped) plus what it needs beyond both (code, metaspace, threads: 155 MiB measured); KServe's
# server in the runtime pod under 16-way v1 load (211 MiB); 15% on top of their sum.
WORKER_PEAK_MIB, JAVA_OVERHEAD_MIB, KSERVE_PEAK_MIB, MARGIN = 720, 160, 220, 1.15
CUDA_HOST_MIB = 400  # per GPU worker: CUDA's host-side libraries and context, an allowance no GPU here measured
MIB = {"Mi": 1, "Gi": 1024}


def served_models(manifest: dict) -> list[str]:
    """The models of the layout a manifest serves (`make kserve`'s --model flags for its storageUri; the
    runtime's default, with no storageUri, is the all-models layout baked into its image)."""
    uri = manifest["spec"]["predictor"]["model"]["storageUri"] if manifest["kind"] == "InferenceService" else ""
    layout = uri.rstrip("/").rsplit("/", 1)[-1] or "kserve"
    [line] = [line for line in kserve_plan().splitlines() if f"--out build/{layout} " in line + " "]
    return re.findall(r"--model (\S+)", line)


@pytest.mark.parametrize("path", SERVICES + [RUNTIME], ids=lambda p: p.name)
def test_memory_limits_hold_the_measured_peaks_of_what_the_pod_runs(path):
    """Requests equal limits (Guaranteed QoS: the pod is the last one evicted), and the limit holds every
    worker's peak, java's bound (its config's heap and direct caps plus what it needs beyond them), KServe's
    server and the margin: adding a worker or raising the heap without raising the limit fails here."""
    from serving.config import PROFILES, read_properties
    from tests import jvm

    manifest = yaml.safe_load(path.read_text())
    resources = (manifest["spec"]["predictor"]["model"]["resources"] if manifest["kind"] == "InferenceService"
                 else manifest["spec"]["containers"][0]["resources"])
    assert resources["requests"] == resources["limits"]
    limit = resources["limits"]["memory"]
    limit_mib = int(limit[:-2]) * MIB[limit[-2:]]
    prod = read_properties(PROFILES["prod"])
    models = json.loads(prod["models"])
    only = served_models(manifest)
    workers = sum(settings["minWorkers"] for name, versions in models.items() if not only or name in only
                  for settings in versions.values())
    bounds = jvm.asked(prod["vmargs"])
    java = (bounds["MaxHeapSize"] + (bounds["MaxDirectMemorySize"] or bounds["MaxHeapSize"])) / 2**20 \
        + JAVA_OVERHEAD_MIB
    gpu = "nvidia.com/gpu" in resources["limits"]
    needed = (workers * (WORKER_PEAK_MIB + (CUDA_HOST_MIB if gpu else 0)) + java + KSERVE_PEAK_MIB) * MARGIN
    assert limit_mib >= needed, f"{path.name}: {workers} workers need {needed:.0f} MiB, the limit is {limit}"
