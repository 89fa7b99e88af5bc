"""KServe's server as this project's runtime runs it: the image's own `kserve_wrapper`, unchanged, except that
TorchServe's answers to bad requests reach the client with their own status.

kserve's `Model._http_predict` (and `explain`) raise httpx's HTTPStatusError for every non-2xx answer of the
predictor, and KServe's server answers that exception with a 500 (its generic handler; kserve 0.11 and 0.13
alike): a client who sent an undecodable image, or too many pixels, is told the server failed, and cannot tell
it from a real failure. Here the wrapper's TorchserveModel gets a `predict` and `explain` that re-raise such an
answer as FastAPI's HTTPException with TorchServe's status (400, 413, 501, 503), the handler's message and its
Retry-After, so KServe's server answers `{"detail": "<the handler's message>"}` with that status; anything else
(TorchServe's own 500, a connection failure) stays what KServe makes of it. Then the wrapper's `__main__` runs
as the image's entrypoint runs it.

It also ends the container when TorchServe's java dies. `torchserve --start` leaves java running on its own, so
in the stock image a java that exits (on a heap OutOfMemoryError, which config.prod.properties' vmargs turn into
an exit) leaves KServe's server up, answering every request with a 500 until someone deletes the pod. Here a
thread watches the pid the launcher recorded and exits the process with status 1 once java is gone, so the
kubelet restarts the container with a whole server.

    python kserve_front.py    (deploy/docker/kserve-entrypoint.sh; KSERVE_WRAPPER_DIR: the image's wrapper)

It runs in the image's interpreter (Python 3.9, kserve 0.13) and imports nothing from this project.
"""
from __future__ import annotations

import os
import runpy
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Awaitable

from fastapi import HTTPException
from httpx import HTTPStatusError

WRAPPER_DIR = Path(os.environ.get("KSERVE_WRAPPER_DIR", "/home/model-server/kserve_wrapper"))
PASSED_ON = {400, 404, 413, 415, 422, 429, 501, 503}  # what the handler and TorchServe say about a request
# Where `torchserve --start` records java's pid (ts/model_server.py, TorchServe 0.9 and 0.12 alike).
PID_FILE = Path(tempfile.gettempdir()) / ".model_server.pid"


def client_error(error: HTTPStatusError) -> HTTPException | None:
    """The HTTPException carrying TorchServe's own answer, or None where KServe's 500 is the truth."""
    response = error.response
    if response is None or response.status_code not in PASSED_ON:
        return None
    try:
        body = response.json()
        message = body.get("error") or body.get("message") or response.text
    except (ValueError, AttributeError):
        message = response.text
    retry = response.headers.get("retry-after")
    return HTTPException(status_code=response.status_code, detail=message,
                         headers={"Retry-After": retry} if retry else None)


async def passing_on(answer: Awaitable):
    """`answer`'s result, or TorchServe's own request error where it failed with one."""
    try:
        return await answer
    except HTTPStatusError as error:
        passed = client_error(error)
        if passed is None:
            raise
        raise passed from error


def keeping_statuses(model_class: type) -> type:
    """`model_class` (the wrapper's TorchserveModel) with TorchServe's request errors passed on."""

    class TorchserveModel(model_class):
        async def predict(self, *args, **kwargs):
            return await passing_on(super().predict(*args, **kwargs))

        async def explain(self, *args, **kwargs):
            return await passing_on(super().explain(*args, **kwargs))

    return TorchserveModel


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie has exited: java's parent, this process once java was reparented to the
    container's first process, has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def exit_when_java_dies(pid: int, every: float = 1.0) -> None:
    while alive(pid):
        time.sleep(every)
    print(f"TorchServe's java (pid {pid}) has exited: ending the container so that it is restarted",
          file=sys.stderr, flush=True)
    os._exit(1)


def main() -> None:
    try:
        java = int(PID_FILE.read_text().strip())
    except (OSError, ValueError):
        sys.exit(f"TorchServe is not running ({PID_FILE} names no pid): the entrypoint starts it first")
    threading.Thread(target=exit_when_java_dies, args=(java,), daemon=True, name="java-watch").start()
    # What `python kserve_wrapper/__main__.py` gives its imports: the wrapper's folder first, and not this file's
    # (beside this project's serving/kserve.py, `import kserve` would find the wrong module).
    sys.path[0] = str(WRAPPER_DIR)
    import TorchserveModel as wrapper_model  # the wrapper's own module; its __main__ imports the class from it

    wrapper_model.TorchserveModel = keeping_statuses(wrapper_model.TorchserveModel)
    runpy.run_path(str(WRAPPER_DIR / "__main__.py"), run_name="__main__")


if __name__ == "__main__":
    main()
