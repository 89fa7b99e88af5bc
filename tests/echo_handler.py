"""A TorchServe handler that answers each request with what its worker handed the handler: the row (each value's
type and bytes) and the request's headers. tests/integration/test_worker_rows.py serves it to check that the
in-process harness (serving/inprocess.py) builds rows and headers exactly as a real frontend and worker do."""
import base64
import json


def _value(value):
    if isinstance(value, (bytes, bytearray)):
        return [type(value).__name__, base64.b64encode(bytes(value)).decode()]
    return [type(value).__name__, value]


def handle(data, context):
    if data is None:  # TorchServe's start-up call
        return None
    answers = []
    for idx, row in enumerate(data):
        headers = context.get_all_request_header(idx) or {}
        answers.append(json.dumps({"row": {name: _value(value) for name, value in row.items()},
                                   "headers": [[name, value] for name, value in headers.items()]}))
    return answers
