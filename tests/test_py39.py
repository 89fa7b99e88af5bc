"""What ships inside an archive, and what the plain image runs beside TorchServe, runs in the runtime images'
Python 3.9 (deploy/kserve/stacks/): ruff checks those files as 3.9 code (pyproject.toml's per-file target) and
this test keeps that list covering them; the stack tests (tests/integration/test_kserve_pod.py) run them there."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from models import zoo
from serving.archive import STAGED_MODULES, handler_source
from serving.catalog import ROOT
from serving.kserve_pod import stack_python
from tests.conftest import require

DOCKERFILES = [ROOT / "deploy" / "docker" / "Dockerfile", ROOT / "deploy" / "docker" / "Dockerfile.kserve"]


def copied(dockerfile: Path) -> dict[str, str]:
    """The repository's files a Dockerfile's COPY lines put in the image → where each lands (folders and build/
    outputs left out)."""
    files = {}
    for line in re.findall(r"^COPY (.+)$", dockerfile.read_text().replace("\\\n", " "), re.MULTILINE):
        *sources, dest = shlex.split(line)
        for source in sources:
            if (ROOT / source).is_file():
                files[source] = dest + Path(source).name if dest.endswith("/") else dest
    return files


# What the Dockerfiles copy beside the archives: what the image runs of this repository besides the archives.
IMAGE_MODULES = sorted({f for dockerfile in DOCKERFILES for f in copied(dockerfile) if f.endswith(".py")})


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


def test_the_plain_images_app_folder_runs_on_its_own(tmp_path):
    """deploy/docker/Dockerfile copies a handful of modules into /home/model-server/app and runs `python -m
    serving.server` there: every module they import must be among them (an import of a module left behind fails
    only in the image, where the repository is absent). Rebuilt here from the COPY lines, run by the image's
    Python with nothing else on its path: its health check must answer as on a host where nothing runs."""
    python = stack_python("0.12.0")
    require(python.exists(), f"{python} is missing: make kserve-stack-0.12.0 (make test builds it)")
    app = tmp_path / "home" / "model-server" / "app"
    for source, dest in copied(DOCKERFILES[0]).items():
        if dest.startswith("/home/model-server/app/"):
            target = app / dest.removeprefix("/home/model-server/app/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, target)
    (tmp_path / "store").mkdir()
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:1\nmanagement_address=http://127.0.0.1:1\n")
    done = subprocess.run([str(python), "-s", "-m", "serving.server", "health", "--config", str(config),
                           "--model-store", str(tmp_path / "store"), "--run-dir", str(tmp_path / "run")],
                          cwd=app, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(app)})  # the image's ENV
    assert (done.returncode, done.stderr.strip()) == (1, "TorchServe is not running"), done.stderr
