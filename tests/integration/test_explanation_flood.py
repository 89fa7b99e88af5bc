"""A flood of explanations does not cost the same version's predictions their latency (issue 26's load, on a real
TorchServe configured as config.properties configures it: cifar10 1.0 and 2.0 with two workers each, mnist one).

Load: 4 clients predicting on cifar10 2.0 and 4 on cifar10 1.0, each sending its next request as soon as the last
is answered (one keep-alive connection per client), for BASELINE_S seconds alone and then for FLOOD_S seconds beside
12 clients asking `POST /explanations/cifar10/2.0` for 4 images each (the documented maximum), which wait the
Retry-After a 503 names before sending again. Asserted, as the issue names them: during the flood the 2.0
predictions' p99 is at most 1 s and their rate at least half of the baseline phase's; explanations are answered
at no less than EXPLAIN_SHARE of the rate one explanation client gets alone, first measured for ALONE_S seconds
(the issue's "at least one a second" held on its AVX-512 host; an AVX2-only host explains at 0.83/s); every
other explanation answers 503 with Retry-After; nothing else but 200; no worker restarted;
every version answers afterwards. Before explanations were kept off the predictions' path, 2.0's predictions got 16
answers in 40 s under this load (p50 11.7 s) on this project's 2-core AMD EPYC host.
"""
from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

from serving.catalog import ROOT
from tests.integration.test_reliability import worker_pids

CAT = (ROOT / "examples" / "cat.png").read_bytes()
EXPLAIN_4 = json.dumps({"data": [base64.b64encode(CAT).decode()] * 4}).encode()
ALONE_S, BASELINE_S, FLOOD_S = 8, 15, 30
PREDICTORS, EXPLAINERS = 4, 12
# Explanations keep going during the flood at no less than this share of the rate one explanation client gets from
# an idle server, on whatever host runs the test: the explaining worker's share of two cores beside the version's
# other worker, the frontend and 1.0's workers is about 0.4-0.5 (0.41 measured on an AMD EPYC with AVX2 only, where
# the absolute rate is 0.83/s; 2.1-3.2/s on an AMD EPYC with AVX-512, the "at least 1/s" host).
EXPLAIN_SHARE = 0.3


Answer = tuple[int, float, dict[str, str]]  # status, seconds, headers (lower-case names)


def load(address: tuple[str, int], seconds: float, explainers: int,
         predictors: int = PREDICTORS) -> tuple[dict[str, list[Answer]], list[bytes]]:
    """Run the clients for `seconds`: per kind ("2.0", "1.0", "explain") every answer, and the first three
    explanations' bodies."""
    results: dict[str, list[Answer]] = {"2.0": [], "1.0": [], "explain": []}
    bodies: list[bytes] = []
    stop_at = time.monotonic() + seconds

    def client(kind: str) -> None:
        path, body, content_type = ((f"/predictions/cifar10/{kind}", CAT, "image/png") if kind != "explain" else
                                    ("/explanations/cifar10/2.0", EXPLAIN_4, "application/json"))
        connection = http.client.HTTPConnection(*address, timeout=60)
        while time.monotonic() < stop_at:
            started = time.monotonic()
            connection.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            answer = response.read()
            headers = {name.lower(): value for name, value in response.getheaders()}
            results[kind].append((response.status, time.monotonic() - started, headers))
            if kind == "explain" and response.status == 200 and len(bodies) < 3:
                bodies.append(answer)
            if response.status == 503:
                time.sleep(float(headers.get("retry-after", 1)))
        connection.close()

    kinds = ["2.0"] * predictors + ["1.0"] * predictors + ["explain"] * explainers
    threads = [threading.Thread(target=client, args=(kind,)) for kind in kinds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, bodies


def p99(answers: list[Answer]) -> float:
    latencies = sorted(seconds for _, seconds, _ in answers)
    return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]


def test_predictions_keep_their_latency_while_explanations_flood_the_same_version(served):
    split = urlsplit(served.url("inference"))
    address = (split.hostname, split.port)
    pids = worker_pids(served)
    alone, _ = load(address, ALONE_S, explainers=1, predictors=0)
    baseline, _ = load(address, BASELINE_S, explainers=0)
    flood, bodies = load(address, FLOOD_S, explainers=EXPLAINERS)

    for phase in (baseline, flood):
        for kind in ("2.0", "1.0"):
            assert {status for status, _, _ in phase[kind]} == {200}, (kind, phase[kind][:5])
    explained = [answer for answer in flood["explain"] if answer[0] == 200]
    refused = [answer for answer in flood["explain"] if answer[0] != 200]
    assert all(status == 503 and headers.get("retry-after") for status, _, headers in refused), refused[:3]

    rate = {name: len(phase["2.0"]) / seconds for name, phase, seconds in
            (("baseline", baseline, BASELINE_S), ("flood", flood, FLOOD_S))}
    summary = (f"2.0 predictions: baseline {rate['baseline']:.1f}/s p99 {p99(baseline['2.0']):.3f} s, flood "
               f"{rate['flood']:.1f}/s p99 {p99(flood['2.0']):.3f} s; explanations {len(explained)} answered "
               f"({len(explained) / FLOOD_S:.2f}/s; one client alone {len(alone['explain']) / ALONE_S:.2f}/s), "
               f"{len(refused)} refused")
    print(summary)
    assert p99(flood["2.0"]) <= 1.0, summary
    assert rate["flood"] >= 0.5 * rate["baseline"], summary
    assert len(explained) / FLOOD_S >= EXPLAIN_SHARE * len(alone["explain"]) / ALONE_S, summary
    # Explanations that shared a batch with predictions were answered as a stream (the predictions went first).
    assert any(headers.get("transfer-encoding") == "chunked" for _, _, headers in explained), summary
    assert bodies
    for body in bodies:
        items = json.loads(body)
        assert len(items) == 4 and items[0]["label"] == "cat" and len(items[0]["attributions"]) == 32

    assert worker_pids(served) == pids
    inference = served.url("inference")
    for path in ("cifar10/1.0", "cifar10/2.0", "mnist"):
        image = CAT if path.startswith("cifar10") else (ROOT / "examples" / "digit7.png").read_bytes()
        assert served.http.post(f"{inference}/predictions/{path}", data=image, timeout=30).status_code == 200
