"""How explanations stay off the predictions' path: slots per version, and a batch's other answers sent first.

Integrated Gradients costs a cifar10 2.0 worker 0.15-0.5 s per 4-image request in 12 steps
(docs/explanations.md), a hundred times a prediction, and TorchServe sends every explanation route (`/explanations`,
KServe's `:explain`) to the same workers and the same server-side batches as the predictions. Two rules keep a
flood of explanations from making predictions wait:

- **Slots.** At most `handler.explain_workers` workers of a version explain at any moment (a non-blocking file
  lock per slot, in the directory TorchServe unpacks once per version; the kernel frees it if the worker dies).
  The other workers only predict, so a prediction never queues behind an explanation; an explanation that finds
  every slot taken answers 503 with Retry-After at once, before its images are decoded. A worker explains at most
  one request per batch, so its work per batch stays bounded by `max_explain_images`.
- **The rest of the batch first.** A worker that explains sends the batch's other answers before it starts:
  one message to the frontend in which those rows are final and the explanation's row opens as a stream
  (`ts_stream_next: true`, TorchServe's streaming protocol, an HTTP chunked response), then the explanation as
  that stream's last chunk once it is computed. So no prediction waits for an explanation it shared a batch with.

The second rule writes on the worker's socket (`context.cl_socket`, as TorchServe's own
`send_intermediate_predict_response` does) and takes the answered rows out of `context.request_ids`, the map
TorchServe's `Service.predict` encodes the batch's final message from; it was read in, and is tested against,
the TorchServe versions below (`EARLY_ANSWERS_CHECKED`). Elsewhere a worker answers the batch at once, as
before, and says so in its log.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import torch

logger = logging.getLogger(__name__)

EARLY_ANSWERS_CHECKED = ("0.9.0", "0.12.0")
MESSAGE = "Prediction success"  # what TorchServe's own Service.predict puts in a batch's reply


def answers_first(server_version: str | None) -> bool:
    """Whether this TorchServe is one the early answers were checked against; elsewhere a batch's predictions
    are answered with its explanation, after it, and the log says so."""
    if str(server_version) in EARLY_ANSWERS_CHECKED:
        return True
    logger.warning("TorchServe %s is not one this handler's early answers were checked against (%s): a batch's "
                   "predictions are answered with its explanation, after it", server_version,
                   ", ".join(EARLY_ANSWERS_CHECKED))
    return False


def attribute(integrated_gradients: Any, images: torch.Tensor, targets: torch.Tensor, baseline: torch.Tensor,
              steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: Integrated Gradients of the target class's output (logit; log-probability for mnist) from the
    black `baseline` in `steps` steps, summed over channels ([n, H, W]), and the completeness delta (how far the
    attributions' sum is from output(image) - output(baseline))."""
    with torch.enable_grad():
        attributions, delta = integrated_gradients.attribute(
            images, baselines=baseline.expand_as(images), target=targets, n_steps=steps, internal_batch_size=steps,
            return_convergence_delta=True)
    return attributions.sum(1).detach().cpu(), delta.detach().cpu()


class Slots:
    """`count` explanation slots shared by a version's workers; `take` returns whether this worker got one."""

    def __init__(self, model_dir: Path, count: int) -> None:
        if count < 1:
            raise ValueError(f"handler.explain_workers must be at least 1, got {count}")
        directory, stem = model_dir, ".explain-slot"
        if not os.access(model_dir, os.W_OK):  # a read-only model directory: one per version in the temp dir
            directory = Path(tempfile.gettempdir())
            stem = f".explain-slot-{hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:16]}"
            logger.warning("%s is read-only: explanation slots are kept in %s", model_dir, directory)
        self.paths = [directory / f"{stem}-{n}.lock" for n in range(count)]
        self.held: IO[str] | None = None

    def take(self) -> bool:
        """Try every slot once, without waiting: a worker waiting for a slot would be a worker not predicting."""
        if self.held is not None:
            return True
        for path in self.paths:
            handle = open(path, "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            self.held = handle
            return True
        return False

    def release(self) -> None:
        if self.held is not None:
            self.held.close()  # closing the file releases its lock
            self.held = None


def answer_first(context: Any, bodies: dict[int, bytes], pending: int) -> None:
    """Send `bodies` (row → its finished answer, whose status and headers are set on `context`) now, and open row
    `pending` as a stream whose last chunk `Service.predict` sends when the handler returns.

    One message: TorchServe's frontend ends a batch with the first message in which no row streams on, and a
    row it gets after that is an error that restarts the worker. The message is TorchServe's own encoding of
    the finished rows followed by its encoding of the pending row (`create_predict_response` writes a code and a
    status message, then the rows, then -1; the second part's header is dropped). The finished rows leave
    `context.request_ids`, so the batch's final message carries the pending row alone.
    """
    from ts.protocol.otf_message_handler import create_predict_response

    ids = context.request_ids
    rows: list[Any] = [b""] * (max([*bodies, pending]) + 1)
    for idx, body in bodies.items():
        rows[idx] = body
    finished = create_predict_response(rows, {idx: ids[idx] for idx in bodies}, MESSAGE, 200, context)
    opened = create_predict_response(rows, {pending: ids[pending]}, MESSAGE, 200, context, ts_stream_next=True)
    header = 8 + len(MESSAGE.encode())
    context.cl_socket.sendall(bytes(finished[:-4] + opened[header:]))
    for idx in bodies:
        del ids[idx]
