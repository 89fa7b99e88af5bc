"""The one base handler behind every classifier: decoding, batching, inference and top-k.

Life cycle, as TorchServe drives it: `initialize` once per worker, then `handle` per server-side batch, which
runs `preprocess` (every request row → images, one uint8 tensor for the whole batch, normalised in one
operation), `inference` (one forward pass, calibrated probabilities) and `postprocess` (top-k per image, one JSON
body per request); a batch with an explanation sends its other answers first, then computes Integrated Gradients
for that one request (handlers/explaining.py says why and how).
A row that cannot be served gets its own 4xx through `context.set_response_status`; the rest of the batch
still answers 200, and no input can raise out of `handle` and cost the batch or the worker.

Every decision is made per request, from that request's own headers: TorchServe's base `handle` decides the
whole batch from the first request's `explain` / `describe` headers, so one client could fail everyone else's
requests. The work one request may cause is bounded too (`Limits`): pixels per request and per batch, checked
from the image headers before anything is decoded, and a deadline per batch well inside the frontend's
response timeout, so no request can make the frontend declare the worker dead.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handlers import explaining, oip, payload
from handlers.imaging import InputError, Limits, decode_opened, open_image
from handlers.payload import Batch
from models import numerics, onnx_runtime
from models.inference import calibrated_probabilities
from models.specs import DatasetSpec

logger = logging.getLogger(__name__)

oip.disable_torchserve_envelopes()  # this handler speaks KServe v1/v2 per request (handlers/oip.py says why)

TOPK_HEADERS = ("x-topk", "topk")
RETRY_AFTER_S = 1  # a request refused for lack of batch budget or time succeeds when sent again
# The gauge each worker keeps of the requests it is answering (`handle` sets it to the batch size, then 0):
# TorchServe's own metrics count a request when it arrives, and nothing says one is held by a worker, so
# retiring a version (client/api.py `drain`) reads this to wait for answers. Exported on :8082/metrics as
# RequestsInHandler{ModelName, ModelVersion, WorkerPid} because config.properties sets model_metrics_auto_detect.
IN_HANDLER_METRIC = "RequestsInHandler"


def detached(error: InputError) -> InputError:
    """`error` as a request's answer to keep: without its traceback or the exception it was raised while handling
    (Pillow's, base64's). Those hold the frames that raised it, and `preprocess`'s frame holds its plans, so a
    kept error would close a cycle only Python's cyclic GC frees; a worker's heap is large and long-lived, full
    collections are rare, and such garbage piled up for as long as bad requests came (+12 MiB per cifar10 worker
    in 4 minutes of them, README "Memory"). Detached, reference counting frees each batch as it ends."""
    error.__context__ = error.__cause__ = None
    return error.with_traceback(None)

class ImageClassifier(BaseHandler):
    """Subclasses set `spec`; everything else, including limits and top-k, comes from the model-config YAML."""

    spec: ClassVar[DatasetSpec]

    def initialize(self, context: Any) -> None:
        """Load the model with weights_only=True and settle every per-request constant once."""
        self.context = context
        self.manifest = context.manifest
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        config = yaml_config.get("handler") or {}

        # Workers are processes: torch threads beyond cores/workers only oversubscribe the CPU. TorchServe tells a
        # worker its batch size (a registration's `batch_size=` wins over the YAML's batchSize) but not how many
        # workers share the cores, so `handler.threads` says it; without it, the YAML's maxWorkers bounds them.
        workers = max(1, int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1))
        threads = int(config.get("threads") or max(1, (os.cpu_count() or 1) // workers))
        torch.set_num_threads(threads)
        batch_size = int(properties.get("batch_size") or yaml_config.get("batchSize") or 1)

        self.device = self._device(properties)
        model = self._load_model(model_dir)
        if config.get("fold_batchnorm", False) and hasattr(model, "fold_batchnorm"):
            model.fold_batchnorm()  # exact in eval mode; opt-in, as it measured no faster on this CPU
        self.tta = int(config.get("tta", 0))
        if self.tta not in self.spec.tta_levels:
            raise ValueError(f"handler.tta must be one of {self.spec.tta_levels} for {self.spec.name} (levels above 0 "
                             f"average over mirror images), got {self.tta}")
        onnx = numerics.OnnxFiles(model_dir, threads, self.tta)
        self.model, self.numerics = self._numerics(model, model_dir, str(config.get("numerics", "auto")), batch_size,
                                                   onnx)
        # Explanations need gradients, so they run in torch float32 whatever serves predictions: the torch mode
        # chosen, or for an ONNX Runtime mode the same arithmetic in channels_last (faster on a CPU, measured).
        self.explainer = (self.model if isinstance(self.model, numerics.Runner) else
                          numerics.Runner(model, "fp32-cl" if self.device.type == "cpu" else "fp32", self.device))
        self.temperature = self._temperature(model_dir)
        self.labels = self._labels(model_dir)
        self.num_classes = len(self.labels)
        self.version = str(self.manifest["model"].get("modelVersion", ""))
        self.model_name = str(self.manifest["model"].get("modelName", self.spec.name))
        self.topk = self._clamp_topk(config.get("topk", 5), "the model-config YAML's handler.topk")
        self.limits = Limits(**{k: int(config[k]) for k in Limits.__dataclass_fields__ if k in config})
        self.explain_steps = int(config.get("explain_steps", 64))
        self.integrated_gradients = self._integrated_gradients()
        self.explain_workers = int(config.get("explain_workers", 1))
        self.slots = explaining.Slots(model_dir, self.explain_workers)
        self.answers_first = str(properties.get("server_version")) in explaining.EARLY_ANSWERS_CHECKED
        if not self.answers_first:
            logger.warning("TorchServe %s is not one this handler's early answers were checked against (%s): a "
                           "batch's predictions are answered with its explanation, after it",
                           properties.get("server_version"), ", ".join(explaining.EARLY_ANSWERS_CHECKED))
        # IN_HANDLER_METRIC's labels; the pid tells a live worker's value from a dead one's (describe lists pids)
        self.in_handler_dimensions = [Dimension("ModelName", context.model_name),
                                      Dimension("ModelVersion", self.version),
                                      Dimension("WorkerPid", str(os.getpid())), Dimension("Level", "Model")]
        # Integrated Gradients' baseline, "no signal": the all-black image (for mnist, an empty page of ink).
        self.baseline = self.spec.normalize(torch.zeros((1, *self.spec.input_shape), dtype=torch.uint8)).to(self.device)
        with torch.inference_mode():  # the first forward pass allocates; pay for it before the first request
            self.model(self.baseline)
        logger.info("%s %s ready on %s: %d threads, %s, topk %d, tta %d, temperature %.4f, limits %s",
                    self.spec.name, self.version, self.device, threads, self.numerics.summary(), self.topk, self.tta,
                    self.temperature, self.limits)
        self.initialized = True

    @staticmethod
    def _device(properties: dict) -> torch.device:
        """The GPU TorchServe assigned this worker (`gpu_id`, present when `number_of_gpu` > 0) if CUDA is
        available, else the CPU: the CPU path never depends on a GPU."""
        gpu_id = properties.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id}")
        return torch.device("cpu")

    def _numerics(self, model: torch.nn.Module, model_dir: Path, requested: str, batch_size: int,
                  onnx: numerics.OnnxFiles) -> tuple[numerics.AnyRunner, numerics.Choice]:
        """The network wrapped in the numeric mode to serve with (models/numerics.py): as configured, or measured
        on this host against the archive's reference images, once per version (its workers share the result).
        An archive without reference images serves fp32."""
        reference_file = model_dir / "reference.npz"
        if requested == "auto" and not reference_file.exists():
            logger.warning("%s has no reference.npz (built before numerics were chosen per host): serving fp32",
                           model_dir)
            return (numerics.Runner(model, "fp32", self.device),
                    numerics.Choice("fp32", "no reference images", batch_size=batch_size))
        if requested != "auto":
            return numerics.choose(model, self.device, requested, torch.empty(0), batch_size, onnx=onnx)
        images, _, fp32_top1 = numerics.load_reference(reference_file)
        return numerics.choose_once(model_dir / ".numerics.json", model, self.device, self.spec.normalize(images),
                                    batch_size, expected=fp32_top1, onnx=onnx)

    def _integrated_gradients(self) -> Any:
        """Captum's Integrated Gradients over the network in float32 (whatever mode predictions use: gradients in
        bf16 would blur the attributions), or None where Captum is not installed: explanations then answer 501
        and predictions are unaffected."""
        try:
            from captum.attr import IntegratedGradients
        except ImportError:
            logger.warning("captum is not installed: /explanations will answer 501")
            return None
        runner = self.explainer
        for parameter in runner.parameters():
            parameter.requires_grad_(False)  # only the input's gradient is needed; serving never trains
        return IntegratedGradients(lambda x: runner.model(x.contiguous(memory_format=runner.memory_format)))

    def _explain_last(self, batch: Batch) -> list[bytes]:
        """The batch's one explanation, after its other rows are answered (`explaining.answer_first`): the
        explanation's own row is the batch's final message. Its status (200) and headers go out with the early
        message, before its attributions exist; computing them on images already decoded and predicted raises no
        known error, and one that did would still answer this row alone, with an error body."""
        idx = batch.explaining
        others = [i for i in range(len(batch.plans)) if i != idx]
        if others and self.answers_first:
            bodies = dict(zip(others, self.postprocess(batch, others)))
            self._headers(idx, len(batch.plans))
            explaining.answer_first(self.context, bodies, idx)
        else:
            bodies = {}
        plan = batch.plans[idx]
        targets = batch.probabilities[plan.start:plan.start + plan.count].argmax(1)
        try:
            batch.explanations[idx] = (*self._explain(batch.images[plan.start:plan.start + plan.count], targets),
                                       targets)
        except Exception:
            logger.exception("the explanation failed")
            batch.plans[idx] = InputError("the explanation could not be computed; /predictions answers the same "
                                          "request", status=500, error_type="InternalServerError")
        if bodies:
            [body] = self.postprocess(batch, [idx])
            return [body if i == idx else b"" for i in range(len(batch.plans))]  # the others are sent already
        return self.postprocess(batch)

    def _explain(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: Integrated Gradients of the target class's output (logit; log-probability for mnist) from
        the black baseline in `explain_steps` steps, summed over channels ([n, H, W]), and the completeness delta
        (how far the attributions' sum is from output(image) - output(baseline))."""
        x = images.to(self.device)
        with torch.enable_grad():
            attributions, delta = self.integrated_gradients.attribute(
                x, baselines=self.baseline.expand_as(x), target=targets.to(self.device), n_steps=self.explain_steps,
                internal_batch_size=self.explain_steps, return_convergence_delta=True)
        return attributions.sum(1).detach().cpu(), delta.detach().cpu()

    def _temperature(self, model_dir: Path) -> float:
        """T for this TTA level and numeric mode: an ONNX Runtime mode's own from the archive's numerics.json
        (int8's logits differ, so the build fitted its T on the validation split, serving/quantize.py), any other
        mode's from the model card (models/calibration.py fits it there). An archive built from a card without
        calibration serves T = 1, the uncalibrated softmax, and says so in its log."""
        card_file = model_dir / "model_card.json"
        card = json.loads(card_file.read_text()) if card_file.exists() else {}
        fitted = card.get("calibration", {}).get("levels", {}).get(str(self.tta))
        if self.numerics.mode in numerics.ORT_MODES:
            fitted = onnx_runtime.shipped(model_dir)[self.numerics.mode].get("levels", {}).get(str(self.tta), fitted)
        if fitted is None:
            logger.warning("%s %s is not calibrated (no temperature for tta %d in %s): its probabilities are the "
                           "raw softmax", self.spec.name, self.manifest["model"].get("modelVersion", ""), self.tta,
                           card_file.name if card_file.exists() else "the archive, which has no model card")
            return 1.0
        temperature = float(fitted["temperature"])
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"{card_file}: temperature for tta {self.tta} must be positive, got {temperature}")
        return temperature

    def _load_model(self, model_dir: Path) -> torch.nn.Module:
        """The archive's model file defines one nn.Module class; its state_dict loads with weights_only=True."""
        model_file = self.manifest["model"]["modelFile"]
        module = importlib.import_module(Path(model_file).stem)
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if c.__module__ == module.__name__ and issubclass(c, torch.nn.Module)]
        if len(classes) != 1:
            raise RuntimeError(f"{model_file} must define exactly one nn.Module class, found {classes}")
        model = classes[0]()
        weights = model_dir / self.manifest["model"]["serializedFile"]
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval()

    def _labels(self, model_dir: Path) -> list[str]:
        """The spec's class names, checked against the archive's index_to_name.json so a stale archive fails."""
        labels = list(self.spec.classes)
        mapping_file = model_dir / "index_to_name.json"
        if mapping_file.exists():
            mapping = json.loads(mapping_file.read_text())
            if [mapping[str(i)] for i in range(len(mapping))] != labels:
                raise RuntimeError(f"{mapping_file} does not match the {self.spec.name} classes {labels}")
        return labels

    def _clamp_topk(self, value: Any, source: str) -> int:
        """A positive integer, clamped to the number of classes; anything else is the client's error."""
        if isinstance(value, str) and re.fullmatch(r"\s*\+?\d+\s*", value):
            value = int(value)
        elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{source} must be a positive integer (1 to {self.num_classes}; larger values are "
                             f"clamped), got {json.dumps(value) if not isinstance(value, str) else repr(value)}",
                             error_type="InvalidTopK")
        return min(value, self.num_classes)

    def _request_topk(self, request: payload.Request, idx: int) -> int:
        if request.topk is not None:
            return self._clamp_topk(request.topk, "topk")
        headers = {key.lower(): value for key, value in (self.context.get_all_request_header(idx) or {}).items()
                   if isinstance(value, str)}
        for name in TOPK_HEADERS:
            if name in headers:
                return self._clamp_topk(headers[name], f"the {name} header")
        return self.topk

    def _check_shape(self, item: payload.Item) -> None:
        """The seeds' envelope may declare a shape; it must describe this model's input."""
        expected = list(self.spec.input_shape)
        accepted = [expected] + ([expected[1:]] if self.spec.channels == 1 else [])
        if item.shape is not None and item.shape not in accepted:
            raise InputError(f"{item.where}.shape is {json.dumps(item.shape)}, but {self.spec.name} expects "
                             f"{json.dumps(expected)} (channels, height, width); omit shape to let the server "
                             "resize any image", error_type="ShapeMismatch")

    def handle(self, data: list[dict], context: Any) -> list[bytes]:
        """One server-side batch → one answer per request, each decided from that request alone.

        A `describe` request (the management API's `?customized=true`) gets this model's description, an
        `explain` request (`/explanations`, KServe's `:explain`) its explanation; the other requests of the batch
        are predicted as usual, and answered before the explanation is computed.
        """
        started = time.time()
        self.context = context
        self._in_handler(len(data))
        try:
            batch = self.inference(self.preprocess(data))
            output = self._explain_last(batch) if batch.explaining is not None else self.postprocess(batch)
        finally:
            self.slots.release()
            self._in_handler(0)
        context.metrics.add_time("HandlerTime", round((time.time() - started) * 1000, 2), None, "ms")
        return output

    def _in_handler(self, count: int) -> None:
        """Set this worker's IN_HANDLER_METRIC gauge (TorchServe's add_metric appends to the list it is given
        when a default label is missing; all are present, so the list built in `initialize` stays as it is)."""
        self.context.metrics.add_metric(IN_HANDLER_METRIC, count, "count", None, self.in_handler_dimensions,
                                        MetricTypes.GAUGE)

    def _header(self, idx: int, name: str) -> str | None:
        value = self.context.get_request_header(idx, name)
        return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value

    def _via_grpc(self, idx: int) -> bool:
        """A gRPC request carries no HTTP headers, only a content-type entry per input: every REST request
        (inference, explanations, the management API's describe) has string headers such as `explain`."""
        headers = self.context.get_all_request_header(idx) or {}
        return all(isinstance(value, dict) for value in headers.values())

    def describe(self) -> dict:
        """What `GET :8081/models/<model>/<version>?customized=true` shows as customizedMetadata."""
        return {"model": self.spec.name, "version": self.version, "labels": self.labels, "topk": self.topk,
                "input": {"shape": list(self.spec.input_shape)}, "tta": self.tta, "temperature": self.temperature,
                "numerics": dataclasses.asdict(self.numerics), "device": str(self.device),
                "explanations": {"method": "integrated gradients (Captum)", "baseline": "black image",
                                 "steps": self.explain_steps, "available": self.integrated_gradients is not None,
                                 "workers": self.explain_workers, "answers_predictions_first": self.answers_first},
                "limits": {k: getattr(self.limits, k) for k in Limits.__dataclass_fields__}}

    def _open_row(self, row: dict, idx: int, explain: bool) -> tuple[list[tuple[Any, str]], tuple, int]:
        """Parse one request and open its images' headers: (images with where they came from,
        (form, k, id, explain), pixel cost). A v2 pixel tensor is already an image: it is only checked against the
        model's input."""
        request = payload.parse(row, self.limits)
        topk = self._request_topk(request, idx)
        if explain and self.integrated_gradients is None:
            raise InputError("explanations need Captum, which this server does not have; /predictions answers the "
                             "same request", status=501, error_type="NotImplemented")
        if explain and len(request.items) > self.limits.max_explain_images:
            raise InputError(f"an explanation costs {self.explain_steps} forward and backward passes per image; the "
                             f"limit is {self.limits.max_explain_images} images per explanation request, this one "
                             f"holds {len(request.items)}", status=413, error_type="RequestTooExpensive")
        opened, cost = [], 0
        for item in request.items:
            self._check_shape(item)
            try:
                if item.pixels is not None:
                    image = oip.to_pixels(item.pixels, self.spec.input_shape)
                    pixels = image.shape[0] * image.shape[1]
                else:
                    image, pixels = open_image(item.data, self.spec.image_size, self.spec.channels, self.limits)
            except InputError as exc:
                raise exc if item.where == "body" else exc.at(item.where) from None
            opened.append((image, item.where))
            cost += pixels
        if cost > self.limits.max_request_pixels:
            raise InputError(f"the request's {len(opened)} image(s) decode to {cost:,} pixels; the limit is "
                             f"{self.limits.max_request_pixels:,} pixels per request (a JPEG counts at the reduced "
                             "scale it is decoded at): send fewer or smaller images", status=413,
                             error_type="RequestTooExpensive")
        return opened, (request.form, topk, request.request_id, explain), cost

    def _decode(self, opened: list[tuple[Any, str]]) -> list[np.ndarray]:
        pixels = []
        for image, where in opened:
            if isinstance(image, np.ndarray):  # a v2 pixel tensor, already the model's size
                pixels.append(image)
                continue
            try:
                pixels.append(decode_opened(image, self.spec.image_size, self.spec.channels,
                                            self.spec.light_on_dark))
            except InputError as exc:
                raise exc if where == "body" else exc.at(where) from None
        return pixels

    def _open(self, row: dict, idx: int) -> Any:
        """First pass over one request, headers only: DESCRIBE, or what `_open_row` returns. Raises InputError
        for a request answered on its own; an explanation that finds no free slot is refused before its body is
        read, so a client that ignores Retry-After costs little."""
        if self._header(idx, "describe") == "True":
            return payload.DESCRIBE
        explain = self._header(idx, "explain") == "True"
        if explain and self.integrated_gradients is not None and not self.slots.take():
            raise self._busy_explaining(batch_has_one=False)
        return self._open_row(row, idx, explain)

    def preprocess(self, data: list[dict]) -> Batch:
        """Decode every request within the batch's budgets; stack all images once and normalise them in one go.

        Headers are read first for the whole batch; then requests are decoded cheapest first, so a small request
        batched with expensive ones is never the one that runs out of pixel budget or time. Past the batch's
        pixel budget or its deadline a request answers 503 with Retry-After, undecoded; the first request
        decoded is always served. So does an explanation beyond the batch's first, or one that finds every
        explanation slot of this version taken (handlers/explaining.py).
        """
        plans: list[Any] = []
        explaining = False  # whether a row of this batch already is its one explanation
        for idx, row in enumerate(data):
            try:
                plan = self._open(row, idx)
                if isinstance(plan, tuple) and plan[1][3]:
                    plan, explaining = self._busy_explaining(batch_has_one=True) if explaining else plan, True
                plans.append(plan)
            except InputError as exc:
                plans.append(detached(exc))
            except Exception as exc:  # a request shape no rule foresaw: still this request's problem alone
                logger.exception("request %d could not be read", idx)
                plans.append(detached(InputError(f"the request could not be read ({type(exc).__name__}); "
                                                 f"{payload.EXPECTED}")))
        deadline = time.monotonic() + self.limits.batch_deadline_ms / 1000
        spent, decoded, explained = 0, False, None
        pixels: list[np.ndarray] = []
        for idx in sorted((i for i, plan in enumerate(plans) if isinstance(plan, tuple)), key=lambda i: plans[i][2]):
            opened, answer, cost = plans[idx]
            if decoded and time.monotonic() > deadline:
                plans[idx] = InputError(f"this server-side batch ran past its {self.limits.batch_deadline_ms} ms "
                                        "deadline before reaching the request; send it again", status=503,
                                        error_type="Busy", retry_after=RETRY_AFTER_S)
                continue
            if decoded and spent + cost > self.limits.max_batch_pixels:
                plans[idx] = InputError(f"the server-side batch this request joined has no decoding budget left "
                                        f"({self.limits.max_batch_pixels:,} pixels per batch); send it again",
                                        status=503, error_type="Busy", retry_after=RETRY_AFTER_S)
                continue
            decoded = True
            try:
                images = self._decode(opened)
            except InputError as exc:
                plans[idx] = detached(exc)
                continue
            spent += cost
            plans[idx] = payload.Planned(len(pixels), len(images), *answer)
            pixels.extend(images)
            if answer[3]:
                explained = idx
        size, channels = self.spec.image_size, self.spec.channels
        stacked = np.stack(pixels) if pixels else np.empty((0, size, size, channels), dtype=np.uint8)
        images = self.spec.normalize(torch.from_numpy(stacked).permute(0, 3, 1, 2))
        if explained is None:
            self.slots.release()  # taken for an explanation that was then refused or failed to decode
        return Batch(images=images, plans=plans, protocols=[payload.protocol_of(row) for row in data],
                     explaining=explained)

    def _busy_explaining(self, *, batch_has_one: bool) -> InputError:
        why = ("this server-side batch already holds an explanation (one per batch)" if batch_has_one else
               f"every worker of this version that may explain (handler.explain_workers = {self.explain_workers}) "
               "is explaining another request; predictions are never kept waiting for explanations")
        return InputError(f"{why}; send it again", status=503, error_type="Busy", retry_after=RETRY_AFTER_S)

    def inference(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """One forward pass (per TTA view) for every image of every request in the batch, then calibrated
        probabilities: softmax(output / T), averaged over the views.

        The MNIST ConvNet outputs log-probabilities; as logits they give the same softmax (softmax(log p) = p), so
        one rule, temperature included, serves both kinds of network. An explanation's images are predicted here
        too: it explains the calibrated top label (`_explain_last`).
        """
        if len(batch.images):
            with torch.inference_mode():
                images = batch.images.to(self.device, non_blocking=True)
                batch.probabilities = calibrated_probabilities(self.model, images, self.tta, self.temperature).cpu()
        return batch

    def _explanation(self, batch: Batch, idx: int, plan: payload.Planned, topk: list[dict[str, float]]) -> Any:
        """One request's explanations in its own form: per image the explained (top) label, its calibrated
        probability, the top-k (`topk`, as a prediction answers it), and the attribution map (H×W, channels
        summed); KServe v1 `{"explanations": [...]}`, v2 an OIP answer with `labels`, `probabilities` and
        `attributions` [N, H, W] tensors."""
        attributions, deltas, targets = batch.explanations[idx]
        probabilities = batch.probabilities[plan.start:plan.start + plan.count]
        labels = [self.labels[int(t)] for t in targets]
        top = [float(probabilities[i, int(t)]) for i, t in enumerate(targets)]
        if plan.form == payload.V2:
            n, height, width = attributions.shape
            return oip.answer(self.model_name, self.version, plan.request_id, [
                {"name": "labels", "datatype": "BYTES", "shape": [n], "data": labels},
                {"name": "probabilities", "datatype": "FP32", "shape": [n], "data": top},
                {"name": "attributions", "datatype": "FP32", "shape": [n, height, width],
                 "data": attributions.flatten().tolist()}])
        items = [{"label": label, "probability": round(p, 6), "model_version": self.version, "topk": topk[i],
                  "attributions": [[round(v, 6) for v in line] for line in attributions[i].tolist()],
                  "completeness_delta": round(float(deltas[i]), 6), "method": "integrated_gradients",
                  "baseline": "black", "steps": self.explain_steps}
                 for i, (label, p) in enumerate(zip(labels, top))]
        if plan.form == payload.KSERVE:
            return {"explanations": items}
        return items[0] if plan.form == payload.SINGLE else items

    def _headers(self, idx: int, batch_size: int) -> None:
        """Which version answered, and how many requests shared its server-side batch: what a rollout or a
        batching configuration is judged by, at the cost of two short headers."""
        self.context.set_response_content_type(idx, "application/json")
        if self._via_grpc(idx):
            # Every answer is complete in one message. The frontend's gRPC StreamPredictions reads this header on
            # each response and fails the worker when it is absent; "false" ends that stream after this message.
            # Only for gRPC: on a REST request the same header, alone, switches the frontend to a chunked response
            # that never completes.
            self.context.set_response_header(idx, "ts_stream_next", "false")
        self.context.set_response_header(idx, "X-Model-Version", self.version)
        self.context.set_response_header(idx, "X-Batch-Size", str(batch_size))

    def postprocess(self, batch: Batch, rows: list[int] | None = None) -> list[bytes]:
        """One compact JSON body per request (of `rows`, by default all): label → probability, highest first,
        rounded to 6 places; a KServe v2 request gets its OIP answer (labels and probabilities as [N, k]
        tensors), any KServe error `{"error": ...}`."""
        results: list[bytes] = []
        top_values = top_indices = None
        if batch.probabilities is not None:
            top_values, top_indices = batch.probabilities.topk(self.num_classes, dim=1)
            top_values, top_indices = top_values.tolist(), top_indices.tolist()
        for idx in range(len(batch.plans)) if rows is None else rows:
            plan = batch.plans[idx]
            self._headers(idx, len(batch.plans))
            if isinstance(plan, InputError):
                self.context.set_response_status(plan.status, plan.phrase, idx)
                if plan.retry_after is not None:
                    self.context.set_response_header(idx, "Retry-After", str(plan.retry_after))
                error = {"error": plan.message} if batch.protocols[idx] else plan.body()  # KServe's error form
                results.append(json.dumps(error, separators=(",", ":")).encode())
                continue
            if plan == payload.DESCRIBE:
                results.append(json.dumps(self.describe(), separators=(",", ":")).encode())
                continue
            span, k = range(plan.start, plan.start + plan.count), plan.k
            if plan.form == payload.V2 and not plan.explain:
                body: Any = oip.response(self.model_name, self.version, plan.request_id,
                                         [[self.labels[c] for c in top_indices[i][:k]] for i in span],
                                         [top_values[i][:k] for i in span])
                results.append(json.dumps(body, separators=(",", ":")).encode())
                continue
            answers = [{self.labels[c]: round(p, 6) for c, p in zip(top_indices[i][:k], top_values[i][:k])}
                       for i in span]
            if plan.explain:
                results.append(json.dumps(self._explanation(batch, idx, plan, answers), separators=(",", ":")).encode())
                continue
            body = answers[0] if plan.form == payload.SINGLE else answers
            if plan.form == payload.KSERVE:
                body = {"predictions": answers}
            results.append(json.dumps(body, separators=(",", ":")).encode())
        return results
