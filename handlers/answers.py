"""The bodies and headers a request is answered with, in the form it asked in.

A prediction is label → probability, highest first, rounded to 6 places: one object for a single image, a list
for a client-side batch, `{"predictions": [...]}` for KServe v1, an Open Inference Protocol answer (labels and
probabilities as [N, k] tensors) for KServe v2. An explanation adds the attribution map per image. An error is
`{"code", "type", "message"}`, or KServe's `{"error": ...}` for a request in one of its protocols.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from handlers import oip, payload
from handlers.imaging import InputError


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def via_grpc(headers: dict) -> bool:
    """A gRPC request carries no HTTP headers, only a content-type entry per input: every REST request
    (inference, explanations, the management API's describe) has string headers such as `explain`."""
    return all(isinstance(value, dict) for value in headers.values())


def set_headers(context: Any, idx: int, batch_size: int, version: str) -> None:
    """Which version answered, and how many requests shared its server-side batch: what a rollout or a batching
    configuration is judged by, at the cost of two short headers."""
    context.set_response_content_type(idx, "application/json")
    if via_grpc(context.get_all_request_header(idx) or {}):
        # Every answer is complete in one message. The frontend's gRPC StreamPredictions reads this header on each
        # response and fails the worker when it is absent; "false" ends that stream after this message. Only for
        # gRPC: on a REST request the same header, alone, switches the frontend to a chunked response that never
        # completes.
        context.set_response_header(idx, "ts_stream_next", "false")
    context.set_response_header(idx, "X-Model-Version", version)
    context.set_response_header(idx, "X-Batch-Size", str(batch_size))


def error(context: Any, idx: int, plan: InputError, kserve: bool) -> bytes:
    """The request's own status (and Retry-After, for a 503 that succeeds when sent again) and error body."""
    context.set_response_status(plan.status, plan.phrase, idx)
    if plan.retry_after is not None:
        context.set_response_header(idx, "Retry-After", str(plan.retry_after))
    return dumps({"error": plan.message} if kserve else plan.body())


class Ranked:
    """Every image's classes by calibrated probability, highest first, ranked once per batch."""

    def __init__(self, probabilities: torch.Tensor | None, labels: list[str]) -> None:
        self.labels = labels
        self.values: list[list[float]] = []
        self.indices: list[list[int]] = []
        if probabilities is not None:
            values, indices = probabilities.topk(len(labels), dim=1)
            self.values, self.indices = values.tolist(), indices.tolist()

    def top(self, plan: payload.Planned) -> list[dict[str, float]]:
        """Per image of the request, its k best labels → probability (rounded to 6 places)."""
        return [{self.labels[c]: round(p, 6) for c, p in zip(self.indices[i][:plan.k], self.values[i][:plan.k])}
                for i in range(plan.start, plan.start + plan.count)]


def prediction(plan: payload.Planned, ranked: Ranked, model_name: str, version: str) -> bytes:
    span = range(plan.start, plan.start + plan.count)
    if plan.form == payload.V2:
        return dumps(oip.response(model_name, version, plan.request_id,
                                  [[ranked.labels[c] for c in ranked.indices[i][:plan.k]] for i in span],
                                  [ranked.values[i][:plan.k] for i in span]))
    answers = ranked.top(plan)
    if plan.form == payload.KSERVE:
        return dumps({"predictions": answers})
    return dumps(answers[0] if plan.form == payload.SINGLE else answers)


def explanation(plan: payload.Planned, ranked: Ranked, explained: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                probabilities: torch.Tensor, model_name: str, version: str, steps: int) -> bytes:
    """Per image the explained (top) label, its calibrated probability, the top-k (as a prediction answers it),
    and the attribution map (H×W, channels summed); KServe v1 `{"explanations": [...]}`, v2 an OIP answer with
    `labels`, `probabilities` and `attributions` [N, H, W] tensors."""
    attributions, deltas, targets = explained
    probabilities = probabilities[plan.start:plan.start + plan.count]
    labels = [ranked.labels[int(t)] for t in targets]
    top = [float(probabilities[i, int(t)]) for i, t in enumerate(targets)]
    if plan.form == payload.V2:
        n, height, width = attributions.shape
        return dumps(oip.answer(model_name, version, plan.request_id, [
            {"name": "labels", "datatype": "BYTES", "shape": [n], "data": labels},
            {"name": "probabilities", "datatype": "FP32", "shape": [n], "data": top},
            {"name": "attributions", "datatype": "FP32", "shape": [n, height, width],
             "data": attributions.flatten().tolist()}]))
    topk = ranked.top(plan)
    items = [{"label": label, "probability": round(p, 6), "model_version": version, "topk": topk[i],
              "attributions": [[round(v, 6) for v in line] for line in attributions[i].tolist()],
              "completeness_delta": round(float(deltas[i]), 6), "method": "integrated_gradients",
              "baseline": "black", "steps": steps}
             for i, (label, p) in enumerate(zip(labels, top))]
    if plan.form == payload.KSERVE:
        return dumps({"explanations": items})
    return dumps(items[0] if plan.form == payload.SINGLE else items)
