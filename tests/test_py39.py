"""What ships inside an archive, and what the plain image runs beside TorchServe, runs in the runtime images'
Python 3.9 (deploy/kserve/stacks/): ruff checks those files as 3.9 code (pyproject.toml's per-file target) and
this test keeps that list covering them; the stack tests (tests/integration/test_kserve_pod.py) run them there."""
from __future__ import annotations

import subprocess
import tomllib
from fnmatch import fnmatch

from models import zoo
from serving.archive import STAGED_MODULES, handler_source
from serving.catalog import ROOT
from serving.kserve_pod import stack_python
from tests.conftest import require

# What deploy/docker/Dockerfile and Dockerfile.kserve copy beside the archives.
IMAGE_MODULES = ["serving/__init__.py", "serving/catalog.py", "serving/server.py", "serving/kserve_front.py",
                 "models/__init__.py", "models/checksum.py"]


def shipped() -> list[str]:
    networks = [str(arch.source_file.relative_to(ROOT)) for arch in zoo.ARCHITECTURES.values()]
    return sorted(set(STAGED_MODULES) | set(networks) | set(IMAGE_MODULES))


def test_ruff_checks_everything_that_ships_as_python_39():
    targets = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["per-file-target-version"]
    for path in shipped():
        versions = [version for pattern, version in targets.items() if fnmatch(path, pattern)]
        assert versions == ["py39"], (path, versions)


def test_what_ships_compiles_on_the_images_python():
    python = stack_python("0.12.0")
    require(python.exists(), f"{python} is missing: make kserve-stack-0.12.0 (make test builds it)")
    done = subprocess.run([str(python), "-c", "import sys\nfor p in sys.argv[1:]: compile(open(p).read(), p, 'exec')\n"
                           "compile(sys.stdin.read(), '<generated handler>', 'exec')", *shipped()],
                          cwd=ROOT, capture_output=True, text=True, input=handler_source("cifar10"))
    assert done.returncode == 0, done.stderr
