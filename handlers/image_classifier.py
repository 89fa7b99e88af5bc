"""The one base handler behind every classifier; an archive's handler is a subclass that names its `spec`.

Life cycle, as TorchServe drives it: `initialize` once per worker, then `handle` per server-side batch, which
runs `preprocess` (every request row → images, one uint8 tensor for the whole batch, normalised in one
operation), `inference` (one forward pass, calibrated probabilities) and `postprocess` (top-k per image, one JSON
body per request); a batch with an explanation sends its other answers first, then computes Integrated Gradients
for that one request. A row that cannot be served gets its own 4xx through `context.set_response_status`; the
rest of the batch still answers 200, and no input can raise out of `handle` and cost the batch or the worker.

The detail is one module away, each staged into the archive beside this file: handlers/loading.py (what
`initialize` settles), handlers/planning.py (each request judged on its own, the batch's budgets and deadline),
handlers/answers.py (the answer formats), handlers/explaining.py (how explanations stay off the predictions'
path), handlers/payload.py and handlers/oip.py (the request forms), handlers/imaging.py (decoding).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handlers import answers, explaining, loading, oip, payload, planning
from handlers.imaging import InputError, Limits
from handlers.payload import Batch
from models import numerics
from models.inference import calibrated_probabilities
from models.specs import DatasetSpec

logger = logging.getLogger(__name__)

# TorchServe's loader wraps `handle` in the configured KServe envelope after importing this module and before
# `initialize`, so the switch to this handler's own KServe protocols must happen at import (handlers/oip.py).
oip.disable_torchserve_envelopes()

# The gauge each worker keeps of the requests it is answering (`handle` sets it to the batch size, then 0):
# TorchServe's own metrics count a request when it arrives, and nothing says one is held by a worker, so
# retiring a version (client/api.py `drain`) reads this to wait for answers. Exported on :8082/metrics as
# RequestsInHandler{ModelName, ModelVersion, WorkerPid} because config.properties sets model_metrics_auto_detect.
IN_HANDLER_METRIC = "RequestsInHandler"


class ImageClassifier(BaseHandler):
    """Subclasses set `spec`; everything else, including limits and top-k, comes from the model-config YAML."""

    spec: ClassVar[DatasetSpec]

    def initialize(self, context: Any) -> None:
        """Load the model with weights_only=True and settle every per-request constant once."""
        self.context, self.manifest, properties = context, context.manifest, context.system_properties
        model_dir = Path(properties["model_dir"])
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        config = yaml_config.get("handler") or {}
        self.version = str(self.manifest["model"].get("modelVersion", ""))
        self.model_name = str(self.manifest["model"].get("modelName", self.spec.name))
        oip.check_loader(properties.get("server_version"))

        threads = loading.threads(yaml_config, config)
        torch.set_num_threads(threads)
        batch_size = int(properties.get("batch_size") or yaml_config.get("batchSize") or 1)  # registration's wins
        self.device = loading.device(properties)
        model = loading.network(model_dir, self.manifest)
        if config.get("fold_batchnorm", False) and hasattr(model, "fold_batchnorm"):
            model.fold_batchnorm()  # exact in eval mode; opt-in, as it measured no faster on this CPU
        self.tta = int(config.get("tta", 0))
        if self.tta not in self.spec.tta_levels:
            raise ValueError(f"handler.tta must be one of {self.spec.tta_levels} for {self.spec.name} (levels above 0 "
                             f"average over mirror images), got {self.tta}")
        self.model, self.numerics = loading.serving_mode(
            model, model_dir, self.spec, self.device, str(config.get("numerics", "auto")), batch_size,
            numerics.OnnxFiles(model_dir, threads, self.tta))
        self.temperature = loading.temperature(model_dir, self.numerics.mode, self.tta,
                                               f"{self.spec.name} {self.version}")
        self.labels = loading.labels(model_dir, self.spec)
        self.explainer = loading.explainer(model, self.model, self.device)
        self.integrated_gradients = loading.integrated_gradients(self.explainer)
        self.explain_workers = int(config.get("explain_workers", 1))
        self.slots = explaining.Slots(model_dir, self.explain_workers)
        self.answers_first = explaining.answers_first(properties.get("server_version"))
        limits = Limits(**{k: int(config[k]) for k in Limits.__dataclass_fields__ if k in config})
        topk = planning.clamp_topk(config.get("topk", 5), "the model-config YAML's handler.topk", len(self.labels))
        self.rules = planning.Rules(self.spec, limits, topk, int(config.get("explain_steps", 64)),
                                    can_explain=self.integrated_gradients is not None)
        # IN_HANDLER_METRIC's labels; the pid tells a live worker's value from a dead one's (describe lists pids)
        self.in_handler_dimensions = [Dimension("ModelName", context.model_name),
                                      Dimension("ModelVersion", self.version),
                                      Dimension("WorkerPid", str(os.getpid())), Dimension("Level", "Model")]
        # Integrated Gradients' baseline, "no signal": the all-black image (for mnist, an empty page of ink).
        self.baseline = self.spec.normalize(torch.zeros((1, *self.spec.input_shape), dtype=torch.uint8)).to(self.device)
        with torch.inference_mode():  # the first forward pass allocates; pay for it before the first request
            self.model(self.baseline)
        logger.info("%s %s ready on %s: %d threads, %s, topk %d, tta %d, temperature %.4f, limits %s",
                    self.spec.name, self.version, self.device, threads, self.numerics.summary(), topk, self.tta,
                    self.temperature, limits)
        self.initialized = True

    def describe(self) -> dict:
        """What `GET :8081/models/<model>/<version>?customized=true` shows as customizedMetadata."""
        rules = self.rules
        return {"model": self.spec.name, "version": self.version, "labels": self.labels, "topk": rules.topk,
                "input": {"shape": list(self.spec.input_shape)}, "tta": self.tta, "temperature": self.temperature,
                "numerics": dataclasses.asdict(self.numerics), "device": str(self.device),
                "explanations": {"method": "integrated gradients (Captum)", "baseline": "black image",
                                 "steps": rules.explain_steps, "available": rules.can_explain,
                                 "workers": self.explain_workers, "answers_predictions_first": self.answers_first},
                "limits": {k: getattr(rules.limits, k) for k in Limits.__dataclass_fields__}}

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

    def preprocess(self, data: list[dict]) -> Batch:
        """Read every request, decode them within the batch's budgets (handlers/planning.py), and stack and
        normalise all their images in one go."""
        plans = planning.read(data, self._open)
        pixels, explained = planning.decode_within_budget(plans, self.rules)
        size, channels = self.spec.image_size, self.spec.channels
        stacked = np.stack(pixels) if pixels else np.empty((0, size, size, channels), dtype=np.uint8)
        if explained is None:
            self.slots.release()  # taken for an explanation that was then refused or failed to decode
        return Batch(images=self.spec.normalize(torch.from_numpy(stacked).permute(0, 3, 1, 2)), plans=plans,
                     protocols=[payload.protocol_of(row) for row in data], explaining=explained)

    def inference(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """One forward pass (per TTA view) for every image of every request in the batch, then calibrated
        probabilities: softmax(output / T), averaged over the views. The MNIST ConvNet outputs log-probabilities;
        as logits they give the same softmax (softmax(log p) = p), so one rule serves both kinds of network."""
        if len(batch.images):
            with torch.inference_mode():
                images = batch.images.to(self.device, non_blocking=True)
                batch.probabilities = calibrated_probabilities(self.model, images, self.tta, self.temperature).cpu()
        return batch

    def postprocess(self, batch: Batch, rows: list[int] | None = None) -> list[bytes]:
        """One compact JSON body per request (of `rows`, by default all), in the form it asked in
        (handlers/answers.py), with its own status and headers."""
        ranked, bodies = answers.Ranked(batch.probabilities, self.labels), []
        for idx in range(len(batch.plans)) if rows is None else rows:
            plan = batch.plans[idx]
            answers.set_headers(self.context, idx, len(batch.plans), self.version)
            if isinstance(plan, InputError):
                bodies.append(answers.error(self.context, idx, plan, kserve=batch.protocols[idx] is not None))
            elif plan == payload.DESCRIBE:
                bodies.append(answers.dumps(self.describe()))
            elif plan.explain:
                bodies.append(answers.explanation(plan, ranked, batch.explanations[idx], batch.probabilities,
                                                  self.model_name, self.version, self.rules.explain_steps))
            else:
                bodies.append(answers.prediction(plan, ranked, self.model_name, self.version))
        return bodies

    def _open(self, row: dict, idx: int) -> Any:
        """The first pass over one request: DESCRIBE, or its `planning.Opened`. An explanation that finds no free
        slot is refused before its body is read, so a client that ignores Retry-After costs little."""
        if self._header(idx, "describe") == "True":
            return payload.DESCRIBE
        explain = self._header(idx, "explain") == "True"
        if explain and self.rules.can_explain and not self.slots.take():
            raise planning.busy(f"every worker of this version that may explain (handler.explain_workers = "
                                f"{self.explain_workers}) is explaining another request; predictions are never kept "
                                "waiting for explanations")
        headers = {key.lower(): value for key, value in (self.context.get_all_request_header(idx) or {}).items()
                   if isinstance(value, str)}
        return planning.open_request(row, headers, explain, self.rules)

    def _explain_last(self, batch: Batch) -> list[bytes]:
        """The batch's one explanation, after its other rows are answered (`explaining.answer_first`): the
        explanation's own row is the batch's final message. Its status (200) and headers go out with the early
        message, before its attributions exist; computing them on images already decoded and predicted raises no
        known error, and one that did would still answer this row alone, with an error body."""
        idx, bodies = batch.explaining, {}
        others = [i for i in range(len(batch.plans)) if i != idx]
        if others and self.answers_first:
            bodies = dict(zip(others, self.postprocess(batch, others)))
            answers.set_headers(self.context, idx, len(batch.plans), self.version)
            explaining.answer_first(self.context, bodies, idx)
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
        """Per image: Integrated Gradients of the target class's output from the black baseline, summed over
        channels, and the completeness delta (handlers/explaining.py `attribute`)."""
        return explaining.attribute(self.integrated_gradients, images.to(self.device), targets.to(self.device),
                                    self.baseline, self.rules.explain_steps)

    def _in_handler(self, count: int) -> None:
        """Set this worker's IN_HANDLER_METRIC gauge (TorchServe's add_metric appends to the list it is given
        when a default label is missing; all are present, so the list built in `initialize` stays as it is)."""
        self.context.metrics.add_metric(IN_HANDLER_METRIC, count, "count", None, self.in_handler_dimensions,
                                        MetricTypes.GAUGE)

    def _header(self, idx: int, name: str) -> str | None:
        value = self.context.get_request_header(idx, name)
        return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value
