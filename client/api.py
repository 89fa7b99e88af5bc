"""TorchServeClient: the inference and management calls this project's README walks through, over `requests`."""
from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

from serving.transport import base_url, session, unix_url

# Where `make serve` (config.properties) puts the management API: a Unix socket in this repository's logs/.
DEFAULT_MANAGEMENT_URL = unix_url(Path(__file__).resolve().parents[1] / "logs" / "management.sock")


class ServerError(RuntimeError):
    """A non-2xx answer, with TorchServe's (or the handler's) JSON message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class NotDrained(ServerError):
    """A version kept receiving requests, or kept holding one, for the whole drain window: retiring it now would
    strand its clients."""

    def __init__(self, model: str, version: str, rate: float, held: int, waited: float) -> None:
        busy = (f"still receives {rate:.1f} requests/s" if rate > 0 else
                f"still holds {held} unanswered request(s)" if held else "went quiet only as the wait ended")
        super().__init__(409, f"{model} {version} {busy} after {waited:.0f} s of waiting; stop sending to it "
                              "(promote or roll back first if it is the default) and let it answer, or pass "
                              "--force (TorchServe 0.12 then drops its queued requests unanswered: their clients "
                              "wait until their own timeout)")


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in version.split("."))


class TorchServeClient:
    def __init__(self, inference_url: str = "http://127.0.0.1:8080", management_url: str = DEFAULT_MANAGEMENT_URL,
                 inference_token: str | None = None, management_token: str | None = None,
                 timeout: float = 60.0, metrics_url: str = "http://127.0.0.1:8082",
                 ca_cert: str | Path | None = None) -> None:
        self.inference_url = inference_url.rstrip("/")
        self.management_url = base_url(management_url).rstrip("/")
        self.metrics_url = metrics_url.rstrip("/")
        self.timeout = timeout
        self.session = session()  # http(s) over TCP, and http+unix for the default profile's management socket
        # The prod profile's self-signed certificate, or your CA's. Passed on every call: a session-wide setting
        # loses to REQUESTS_CA_BUNDLE in the environment.
        self.verify: str | bool = str(ca_cert) if ca_cert else True
        self._auth = {"inference": inference_token, "management": management_token}

    @classmethod
    def from_key_file(cls, key_file: Path, **kwargs: Any) -> TorchServeClient:
        """Use the keys TorchServe wrote when token authorization is on (key_file.json)."""
        keys = json.loads(Path(key_file).read_text())
        return cls(inference_token=keys["inference"]["key"], management_token=keys["management"]["key"], **kwargs)

    def _call(self, api: str, method: str, path: str, **kwargs: Any) -> Any:
        base = self.inference_url if api == "inference" else self.management_url
        headers = kwargs.pop("headers", {})
        if self._auth[api]:
            headers["Authorization"] = f"Bearer {self._auth[api]}"
        response = self.session.request(method, base + path, headers=headers, timeout=self.timeout,
                                        verify=self.verify, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if not response.ok:
            message = body.get("message", body) if isinstance(body, dict) else body
            raise ServerError(response.status_code, str(message))
        return body

    # --- inference ------------------------------------------------------------------------------------------
    def _predict_path(self, model: str, version: str | None) -> str:
        return f"/predictions/{model}" + (f"/{version}" if version else "")

    def predict(self, image: bytes | str | Path, model: str = "cifar10", version: str | None = None,
                topk: int | None = None, protocol: str = "native") -> dict[str, float]:
        """Top-k labels → probabilities for one image, over this project's own API (raw bytes in the body) or
        KServe's v1 (`{"instances": [{"b64": ...}]}`) or v2 (Open Inference Protocol, a BYTES input)."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        headers = {"Content-Type": "application/octet-stream"}
        if topk is not None:
            headers["X-TopK"] = str(topk)
        if protocol == "native":
            return self._call("inference", "POST", self._predict_path(model, version), data=data, headers=headers)
        if protocol not in ("v1", "v2"):
            raise ValueError(f"protocol must be native, v1 or v2, got {protocol!r}")
        if version:
            raise ValueError("KServe's paths reach a model's default version only (TorchServe 0.12 routes no "
                             "version segment on them); use --protocol native for a named version, or serve that "
                             "version as its own KServe revision (docs/kserve.md: canary)")
        encoded = base64.b64encode(data).decode()
        if protocol == "v1":
            body = {"instances": [{"b64": encoded}], **({"topk": topk} if topk is not None else {})}
            return self._call("inference", "POST", f"/v1/models/{model}:predict", json=body)["predictions"][0]
        body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [encoded]}],
                **({"parameters": {"topk": topk}} if topk is not None else {})}
        answer = self._call("inference", "POST", f"/v2/models/{model}/infer", json=body)
        outputs = {o["name"]: o["data"] for o in answer["outputs"]}
        return dict(zip(outputs["labels"], outputs["probabilities"], strict=True))

    # --- management -----------------------------------------------------------------------------------------
    def versions(self, model: str) -> list[dict]:
        """Every registered version of `model` with its workers, sorted by version; `default` marks the one
        /predictions/<model> answers with."""
        default = self.default_version(model)
        described = self._call("management", "GET", f"/models/{model}/all")
        return sorted(({**d, "default": d["modelVersion"] == default} for d in described),
                      key=lambda d: _version_key(d["modelVersion"]))

    def handler_description(self, model: str, version: str) -> dict | None:
        """What one worker of that version says about itself (labels, limits, the numerics it chose and its
        timings): the management API's `?customized=true`, answered by the handler's `describe`. None when the
        version has no ready worker to ask."""
        described = self._call("management", "GET", f"/models/{model}/{version}", params={"customized": "true"})
        metadata = described[0].get("customizedMetadata") if described else None
        if isinstance(metadata, str):  # older frontends hand the handler's JSON through as a string
            metadata = json.loads(metadata) if metadata.startswith("{") else None
        return metadata if isinstance(metadata, dict) else None

    def default_version(self, model: str) -> str:
        """Describing a model without a version describes its default version."""
        return self._call("management", "GET", f"/models/{model}")[0]["modelVersion"]

    def register(self, archive: str, workers: int = 1, **config: Any) -> str:
        """Register an archive from the model store (file name, e.g. cifar10-2.0.mar) and start its workers."""
        params = {"url": archive, "initial_workers": workers, "synchronous": "true", **config}
        return self._call("management", "POST", "/models", params=params)["status"]

    def promote(self, model: str, version: str) -> str:
        """Make `version` the one /predictions/<model> answers with."""
        return self._call("management", "PUT", f"/models/{model}/{version}/set-default")["status"]

    def rollback(self, model: str) -> str:
        """Make the newest version older than the current default the default again; returns that version."""
        current = _version_key(self.default_version(model))
        older = [d["modelVersion"] for d in self.versions(model) if _version_key(d["modelVersion"]) < current]
        if not older:
            raise ServerError(409, f"{model} has no version older than its default to roll back to")
        self.promote(model, older[-1])
        return older[-1]

    def _metrics(self) -> str:
        return self.session.get(f"{self.metrics_url}/metrics", timeout=self.timeout, verify=self.verify).text

    def arrivals(self, model: str, version: str) -> float:
        """How many requests have arrived for this version (Prometheus `ts_inference_requests_total`, which the
        frontend counts when a request arrives, not when it is answered).

        TorchServe labels a request by the version its URL names, and `default` when it names none; the
        `default` count is included while this version is the default, as those requests are its own then.
        """
        labels = [version] + (["default"] if self.default_version(model) == version else [])
        text = self._metrics()
        return sum(value for label in labels for _, value in
                   _labelled(text, "ts_inference_requests_total", model_name=model, model_version=label))

    def held(self, model: str, version: str) -> int:
        """Requests this version has accepted and not yet answered: those queued in the frontend (describe's
        `jobQueueStatus.pendingRequests`) and those its live workers are answering (the handler's
        `RequestsInHandler` gauge, one per worker pid; a dead worker's last value is left out, as TorchServe
        sends the requests it held to another worker, where they count again)."""
        described = self._call("management", "GET", f"/models/{model}/{version}")[0]
        queued = int(described.get("jobQueueStatus", {}).get("pendingRequests", 0))
        live = {str(w["pid"]) for w in described.get("workers", []) if w.get("pid") not in (None, -1)}
        gauges = _labelled(self._metrics(), "RequestsInHandler", ModelName=model, ModelVersion=version)
        return queued + int(sum(value for labels, value in gauges if labels.get("WorkerPid") in live))

    def drain(self, model: str, version: str, quiet_s: float = 2.0, timeout_s: float = 30.0) -> float:
        """Wait until nobody has sent `version` a request for `quiet_s` seconds and it holds none (`held`: none
        queued, none in a worker), seen twice in a row. Returns the seconds waited; raises NotDrained after
        `timeout_s`.

        TorchServe 0.12 offers no way to stop routing to a named version, and unregistering or scaling it to 0
        drops its queued requests without an answer, so retiring it safely means waiting until nobody sends to
        it and it has answered everything it took. Seen twice, `held` (0.25 s or the version's batch delay apart,
        whichever is longer) also covers a request between the queue and a worker: the frontend's batch
        aggregator holds it for at most maxBatchDelay, where neither count sees it.
        """
        started = time.monotonic()
        described = self._call("management", "GET", f"/models/{model}/{version}")[0]
        interval = max(0.25, 2 * float(described.get("maxBatchDelay", 0)) / 1000)
        first = count = self.arrivals(model, version)
        quiet_since, idle = time.monotonic(), 0
        while True:
            if time.monotonic() - quiet_since >= quiet_s:
                held = self.held(model, version)
                idle = idle + 1 if held == 0 else 0
                if idle == 2:
                    return time.monotonic() - started
            waited = time.monotonic() - started
            if waited > timeout_s:
                receiving = time.monotonic() - quiet_since < quiet_s  # the rate: over the whole wait
                rate = (self.arrivals(model, version) - first) / waited if receiving else 0.0
                raise NotDrained(model, version, rate, 0 if receiving else self.held(model, version), waited)
            time.sleep(interval)
            now = self.arrivals(model, version)
            if now != count:
                count, quiet_since, idle = now, time.monotonic(), 0

    def scale(self, model: str, workers: int, version: str | None = None, force: bool = False,
              drain_timeout_s: float = 30.0, quiet_s: float = 2.0) -> str:
        """Set the version's workers; scaling to 0 drains first (see `drain`) unless `force`."""
        path = f"/models/{model}" + (f"/{version}" if version else "")
        if workers == 0 and not force:
            self.drain(model, version or self.default_version(model), quiet_s, drain_timeout_s)
        params = {"min_worker": workers, "max_worker": workers, "synchronous": "true"}
        return self._call("management", "PUT", path, params=params)["status"]

    def unregister(self, model: str, version: str, force: bool = False, drain_timeout_s: float = 30.0,
                   quiet_s: float = 2.0) -> str:
        """Retire a version that is not the default, after it has drained (see `drain`) unless `force`."""
        if not force:
            if self.default_version(model) == version and len(self.versions(model)) > 1:
                raise ServerError(403, f"{model} {version} is the default version; promote another one first")
            self.drain(model, version, quiet_s, drain_timeout_s)
        return self._call("management", "DELETE", f"/models/{model}/{version}")["status"]


def _labelled(text: str, name: str, **wanted: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name` in Prometheus text whose labels include `wanted`: (labels, value)."""
    samples = []
    for match in re.finditer(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
        if all(labels.get(key) == value for key, value in wanted.items()):
            samples.append((labels, float(match.group(2))))
    return samples


def numerics_choice(choice: dict) -> str:
    """`ort-int8 (auto; fp32 154 img/s, fp32-cl 222 img/s, ort-int8 560 img/s; validation accuracy ort-int8 93.16%)`
    from a handler description's `numerics`: what a worker chose, measured, and the accuracy the archive's build
    measured for its ONNX Runtime modes, as `python -m client versions` and the benchmark's results say it."""
    timed = ", ".join(f"{mode} {rate:.0f} img/s" for mode, rate in choice.get("images_per_s", {}).items())
    accuracy = ", ".join(f"{mode} {share:.2%}" for mode, share in choice.get("accuracy", {}).items())
    details = [choice["chosen_by"], *([timed] if timed else []),
               *([f"validation accuracy {accuracy}"] if accuracy else [])]
    return f"{choice['mode']} ({'; '.join(details)})"
