"""A KServe TorchServe pod rebuilt on this machine from the pieces its image runs (no container engine here).

    make kserve-pod [STACK=0.12.0] [PROTOCOL=v1|v2|grpc-v2]
    python -m serving.kserve_pod --stack 0.12.0 [--protocol v2] [--envelope kservev2] [--front project|stock]

What runs, and where each piece comes from:
- the image's interpreter stack: `.venv-kfs-<version>/` (`make kserve-stack-<version>` installs
  deploy/kserve/stacks/torchserve-kfs-<version>.txt on pyenv's Python 3.9);
- the pod's filesystem: a private mount namespace (`unshare`) in which a folder holding `models/` is bound over
  /mnt, so the layout `make kserve` writes (or KServe's storage code downloaded) is at /mnt/models exactly as the
  storage initializer leaves it, every path in its config unchanged;
- the image's entrypoint: TorchServe started with the ClusterServingRuntime's own arguments
  (deploy/kserve/custom-runtime.yaml, the same as KServe's `kserve-torchserve`) and TS_SERVICE_ENVELOPE as KServe
  sets it from the `serviceEnvelope` label ("" without one), then KServe's own server: the image's
  `kserve_wrapper/` (../shared/kserve/torchserve-kfs/<version>/), run unchanged, with the protos compiled from
  TorchServe's jar as the image's Dockerfile compiles them and PROTOCOL_VERSION as the runtime sets it; started
  either by the kfs image's own entrypoint ("stock") or by this project's runtime image's
  (deploy/docker/kserve-entrypoint.sh, "project": the same wrapper through serving/kserve_front.py).
The ports are the image's: the wrapper's 8080 (HTTP) and 8081 (gRPC) are fixed in its `__main__.py`, TorchServe's
come from the layout (8085, 7070 and 7071 on loopback, 8082 for metrics), so one pod runs at a time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from serving.catalog import ROOT
from serving.config import port_is_free
from serving.preflight import StartupError
from serving.process import TorchServe

STACKS = ("0.9.0", "0.12.0")
KFS = ROOT.parent / "shared" / "kserve" / "torchserve-kfs"
RUNTIME = ROOT / "deploy" / "kserve" / "custom-runtime.yaml"
WRAPPER_HTTP, WRAPPER_GRPC = 8080, 8081  # kserve_wrapper/__main__.py: ModelServer(http_port=8080, grpc_port=8081)
PROTOS = ("inference.proto", "management.proto")
POD_PORTS = (WRAPPER_HTTP, WRAPPER_GRPC, 8082, 8085, 7070, 7071)  # the wrapper's, then the layout's TorchServe


def stack_python(stack: str) -> Path:
    """The interpreter of the image's stack, as `make kserve-stack-<stack>` installs it."""
    return ROOT / f".venv-kfs-{stack}" / "bin" / "python"


def wrapper_dir(stack: str) -> Path:
    return KFS / stack / "kserve_wrapper"


FRONT = ROOT / "serving" / "kserve_front.py"
PROJECT_ENTRYPOINT = ROOT / "deploy" / "docker" / "kserve-entrypoint.sh"
# Inside the pod's mount namespace, after /mnt is bound: the image's entrypoint. "stock" is the kfs images'
# dockerd-entrypoint.sh (`set -e; eval "$@"; python /home/model-server/kserve_wrapper/__main__.py`; the runtime's
# args start TorchServe, which returns once java is launched, then KServe's server runs in the foreground);
# "project" is deploy/docker/kserve-entrypoint.sh, this project's runtime image's, run from its file.
ENTRYPOINTS = {"stock": 'set -e; mount --bind "$0" /mnt; eval "$@"; exec python "$KSERVE_WRAPPER_DIR/__main__.py"',
               "project": f'set -e; mount --bind "$0" /mnt; exec bash {PROJECT_ENTRYPOINT} "$@"'}


def runtime_container() -> dict:
    """The serving runtime's container: its args and env are what the pod runs."""
    return yaml.safe_load(RUNTIME.read_text())["spec"]["containers"][0]


def compile_protos(stack: str, out: Path) -> Path:
    """inference_pb2(_grpc) and management_pb2(_grpc) into `out`, from the .proto files inside the stack's
    TorchServe jar (the image's Dockerfile compiles the same files with the same grpc_tools)."""
    python = stack_python(stack)
    package = subprocess.run([str(python), "-c", "import os, ts; print(os.path.dirname(ts.__file__))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    source = out / "proto"
    with zipfile.ZipFile(Path(package) / "frontend" / "model-server.jar") as jar:
        for name in jar.namelist():
            if name in PROTOS or (name.startswith("google/rpc/") and name.endswith(".proto")):
                jar.extract(name, source)
    subprocess.run([str(python), "-m", "grpc_tools.protoc", f"-I{source}", f"--python_out={out}",
                    f"--grpc_python_out={out}", *(str(source / p) for p in PROTOS)], check=True,
                   capture_output=True)
    return out


@dataclass
class Pod:
    """TorchServe and KServe's server of one image's stack, serving the layout at `mnt`/models."""

    stack: str
    mnt: Path  # bound over /mnt inside the pod: holds models/config/config.properties and models/model-store/
    run_dir: Path
    protocol: str = "v1"  # PROTOCOL_VERSION: v1, v2 or grpc-v2
    envelope: str = ""  # TS_SERVICE_ENVELOPE: "", kserve or kservev2
    front: str = "stock"  # the kfs image's own entrypoint, or this project's runtime image's (ENTRYPOINTS)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. MODEL_LOAD_DELAY for the wrapper

    def __post_init__(self) -> None:
        if self.stack not in STACKS:
            raise ValueError(f"stack must be one of {STACKS}, got {self.stack!r}")
        if self.front not in ENTRYPOINTS:
            raise ValueError(f"front must be one of {sorted(ENTRYPOINTS)}, got {self.front!r}")
        for needed, how in ((stack_python(self.stack), f"make kserve-stack-{self.stack}"),
                            (wrapper_dir(self.stack), "../shared/kserve (the project's machines have it)"),
                            (self.mnt / "models" / "config" / "config.properties", "make kserve")):
            if not needed.exists():
                raise StartupError(f"{needed} is missing: {how}")
        if shutil.which("unshare") is None:
            raise StartupError("unshare (util-linux) is needed to give the pod its own /mnt")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        layout = self.mnt / "models"
        # What the pod reads is the layout as it lies; the TorchServe object only finds its logs, pid and READY
        # workers (through the management address, which is the pod's loopback and so this machine's).
        self.torchserve = TorchServe(config=layout / "config" / "config.properties",
                                     model_store=layout / "model-store", run_dir=self.run_dir / "torchserve")
        self.wrapper: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{WRAPPER_HTTP}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{WRAPPER_GRPC}"

    def launch(self) -> None:
        """Run the image's entrypoint in the pod's mount namespace; returns at once."""
        busy = self.busy_ports()
        if busy:
            raise StartupError(f"port {busy[0]} is in use: the pod needs the image's ports (8080, 8081 for "
                               "KServe's server, the layout's for TorchServe)")
        generated = compile_protos(self.stack, self.run_dir / "protos")
        container = runtime_container()
        args = container["args"]
        env = self.torchserve.launch_env()
        # The runtime's env as KServe renders it: TS_SERVICE_ENVELOPE from the serviceEnvelope label.
        env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
        env.update(TS_SERVICE_ENVELOPE=self.envelope, PROTOCOL_VERSION=self.protocol,
                   PATH=f"{stack_python(self.stack).parent}{os.pathsep}{os.environ['PATH']}",
                   PYTHONPATH=str(generated), KSERVE_WRAPPER_DIR=str(wrapper_dir(self.stack)),
                   KSERVE_FRONT=str(FRONT), **self.extra_env)
        namespace = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
        with open(self.run_dir / "wrapper.log", "ab") as log:
            self.wrapper = subprocess.Popen([*namespace, "bash", "-c", ENTRYPOINTS[self.front], str(self.mnt.resolve()),
                                             *args],
                                            cwd=self.run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def busy_ports(self) -> list[int]:
        """The pod's ports that something already holds: KServe's server's and the layout's TorchServe ones."""
        ts = [port for _, port in self.torchserve.ports() if not port_is_free("127.0.0.1", port)]
        return ts + [port for port in (WRAPPER_HTTP, WRAPPER_GRPC) if not port_is_free("0.0.0.0", port)]

    def ready(self) -> bool:
        """KServe's own readiness (the v2 health route, which every kserve release serves for both protocols)."""
        try:
            return requests.get(f"{self.http}/v2/health/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def defaults_not_ready(self) -> list[str]:
        """Models whose default version has no READY worker, judged as the 0.12.0 wrapper judges it: `GET
        <management>/models/<name>` (TorchServe 0.9.0 answers 404 to `/models/<name>/all` when, as in this
        layout, inference and management share one address)."""
        missing = []
        for model in self.torchserve.declared_models():
            try:
                described = requests.get(f"{self.torchserve.url('management')}/models/{model}", timeout=5).json()
                ready = any(w.get("status") == "READY" for w in described[0].get("workers", []))
            except (requests.RequestException, ValueError, KeyError, IndexError, AttributeError):
                ready = False
            if not ready:
                missing.append(model)
        return missing

    def wait_ready(self, timeout: float = 300.0) -> float:
        started = time.monotonic()
        while not self.ready():
            if self.wrapper is not None and self.wrapper.poll() is not None:
                raise StartupError(f"KServe's server exited ({self.wrapper.returncode}):\n{self.log_tail()}")
            if time.monotonic() - started > timeout:
                raise StartupError(f"KServe's server not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)
        return time.monotonic() - started

    def start(self, timeout: float = 300.0) -> float:
        self.launch()
        try:
            return self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 30) -> str:
        self.torchserve.logs.poll()
        wrapper = (self.run_dir / "wrapper.log").read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(["--- wrapper.log", *wrapper, "--- TorchServe", self.torchserve.logs.tail(10)])

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the entrypoint's process group (KServe's server), stop TorchServe, and return once the pod's
        ports are free again, so the next pod can start at once."""
        if self.wrapper is None:
            return
        if self.wrapper.poll() is None:
            os.killpg(self.wrapper.pid, signal.SIGTERM)
            try:
                self.wrapper.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.wrapper.pid, signal.SIGKILL)
                self.wrapper.wait(10)
        self.torchserve.stop()
        self.torchserve.kill_orphans()  # a java whose pid file went missing still names our TMPDIR
        self.wrapper = None
        deadline = time.monotonic() + timeout
        while busy := self.busy_ports():
            if time.monotonic() > deadline:
                raise StartupError(f"ports {busy} still in use {timeout:.0f} s after the pod stopped")
            time.sleep(0.2)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", choices=STACKS, default="0.12.0")
    p.add_argument("--mnt", type=Path, default=ROOT / "build" / "kserve-pod",
                   help="the folder bound over /mnt; its models/ is (re)written from `make kserve`'s build/kserve")
    p.add_argument("--protocol", choices=("v1", "v2", "grpc-v2"), default="v1")
    p.add_argument("--envelope", choices=("", "kserve", "kservev2"), default="")
    p.add_argument("--front", choices=sorted(ENTRYPOINTS), default=None,
                   help="project: this project's runtime image (deploy/docker/kserve-entrypoint.sh, on 0.12.0); "
                   "stock: the kfs image's own entrypoint (default for 0.9.0, the stock runtime's image)")
    p.add_argument("--run-dir", type=Path, default=ROOT / "logs" / "kserve-pod")
    args = p.parse_args(argv)
    layout = ROOT / "build" / "kserve"
    if not (layout / "config").is_dir():
        raise SystemExit(f"{layout} is missing: run `make kserve` first")
    shutil.rmtree(args.mnt / "models", ignore_errors=True)
    shutil.copytree(layout, args.mnt / "models")
    front = args.front or ("project" if args.stack == "0.12.0" else "stock")
    pod = Pod(args.stack, args.mnt, args.run_dir.resolve(), args.protocol, args.envelope, front)
    # SIGTERM (`kill`, make being stopped) stops the pod as Ctrl-C does: its processes run in their own session.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        print(f"ready after {pod.start():.1f} s: {pod.http} (HTTP), {pod.grpc} (gRPC); Ctrl-C stops it",
              flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        pod.stop()


if __name__ == "__main__":
    main()
